"""Research tools: the conditioning probe command, the experiment runner and its report
(the probe itself is model/probe.py)."""
