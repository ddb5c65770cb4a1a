"""A checkpoint is data, not code: the globals its pickles name, checked before anything loads it.

DeepSpeed's resume, its universal conversion and the export all `torch.load` with
`weights_only=False`, and unpickling calls whatever a pickle's GLOBAL opcodes name: a folder
someone hands you could run `os.system`. `check_folder` reads every pickle of a checkpoint with
`pickletools` (which parses, never executes) and refuses a global outside ALLOWED with a
ConfigError naming the file and the global. ALLOWED is what DeepSpeed 0.19 and this project
write into checkpoints of ZeRO stages 0-3 in fp32 and bf16, their universal copies and the
client state (tests/test_export.py checks it against the fixture runs' real checkpoints).
"""

from __future__ import annotations

import _compat_pickle
import pickletools
import zipfile
from pathlib import Path

from core.errors import ConfigError

# module -> names allowed from it: what real checkpoints hold (tests/test_export.py checks the
# fixture runs against it), plus the other tensor storages and numpy's old name
_STORAGES = {
    f"{kind}Storage" for kind in ("Byte", "Char", "Short", "Int", "Long", "Half", "Float", "Double", "BFloat16", "Bool")
}
ALLOWED: dict[str, set[str]] = {
    "collections": {"OrderedDict"},
    "torch": {"Size", "Tensor", *_STORAGES},
    "torch._utils": {"_rebuild_tensor_v2", "_rebuild_parameter"},
    "torch._tensor": {"_rebuild_from_type_v2"},
    "numpy": {"dtype", "ndarray"},
    "numpy.core.multiarray": {"_reconstruct"},
    "numpy._core.multiarray": {"_reconstruct"},
    "_codecs": {"encode"},  # bytes in a protocol-2 pickle
    "deepspeed.runtime.fp16.loss_scaler": {"LossScaler", "DynamicLossScaler"},
    "deepspeed.runtime.zero.config": {"ZeroStageEnum"},
    "deepspeed.utils.tensor_fragment": {"fragment_address"},
}
PICKLED_SUFFIXES = (".pt", ".pth", ".bin", ".pkl")
STRING_OPS = ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING", "SHORT_BINSTRING")


def pickle_globals(data: bytes) -> list[tuple[str, str]]:
    """The (module, name) pairs a pickle's GLOBAL, INST and STACK_GLOBAL opcodes import, in order,
    found without unpickling. STACK_GLOBAL takes its names from the two strings pushed before it
    (through the memo, as the pickler writes them)."""
    found: list[tuple[str, str]] = []
    strings: list[str] = []  # the string values pushed so far, newest last
    memo: dict[int, str | None] = {}
    top: str | None = None  # the value on top of the stack when it is a string
    for op, arg, _ in pickletools.genops(data):
        pushed = None
        if op.name in ("GLOBAL", "INST"):
            module, _, name = arg.partition(" ")
            found.append((module, name))
        elif op.name == "STACK_GLOBAL":
            if len(strings) < 2:
                raise ValueError("STACK_GLOBAL without two names before it")
            found.append((strings[-2], strings[-1]))
        elif op.name in STRING_OPS:
            pushed = str(arg)
        elif op.name == "MEMOIZE":
            memo[len(memo)] = top
            pushed = top
        elif op.name in ("BINPUT", "LONG_BINPUT", "PUT"):
            memo[arg] = top
            pushed = top
        elif op.name in ("BINGET", "LONG_BINGET", "GET"):
            pushed = memo.get(arg)
        if pushed is not None and op.name not in ("MEMOIZE", "BINPUT", "LONG_BINPUT", "PUT"):
            strings.append(pushed)
        top = pushed
    return found


def allowed(module: str, name: str) -> bool:
    """Python 2 names (protocol 2 pickles: __builtin__.set) are read as the unpickler maps them."""
    module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
    module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    names = ALLOWED.get(module, set())
    return "*" in names or name in names


def file_pickles(path: Path) -> list[tuple[str, bytes]]:
    """(member, bytes) of each pickle in a torch file: the .pkl members of its zip archive."""
    if not zipfile.is_zipfile(path):
        raise ConfigError(f"{path}: not a torch zip checkpoint file; refusing to load it")
    with zipfile.ZipFile(path) as z:
        return [(n, z.read(n)) for n in z.namelist() if n.endswith(".pkl")]


def check_file(path: Path) -> None:
    for member, data in file_pickles(path):
        try:
            names = pickle_globals(data)
        except Exception as e:  # noqa: BLE001 - any parse failure means we cannot vouch for it
            raise ConfigError(f"{path} ({member}): unreadable pickle ({e}); refusing to load it") from None
        bad = next(((m, n) for m, n in names if not allowed(m, n)), None)
        if bad:
            raise ConfigError(
                f"{path}: its pickle imports {bad[0]}.{bad[1]}, which no checkpoint of this project holds; "
                "refusing to load it (a pickle can run code)"
            )


def checked_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in PICKLED_SUFFIXES)


def check_folder(folder: Path) -> None:
    """ConfigError when a pickled file under `folder` names a global outside ALLOWED."""
    for path in checked_files(folder):
        check_file(path)
