"""Models fgm did not train: the architectures and datasets of a `models.toml`,
and the state-dict checkpoints that go with them (fgm-ingest TABLE --models TOML).

    [arch.small_resnet]
    source = "python:zoo.py:SmallResNet"   # or "torchvision:resnet18", "timm:resnet18"
    kwargs = { num_classes = 10, width = "hp.width" }

    [dataset.mydata]
    source = "npz:data.npz"     # x_train, y_train, x_test, y_test
    mean = [0.5, 0.5, 0.5]      # per channel, after scaling uint8 images to [0, 1]
    std = [0.25, 0.25, 0.25]
    # or: source = "torchvision:CIFAR10", root = "~/data"

An architecture and a dataset are stored in the warehouse as JSON (`spec`), so
that fgm-measure, on this machine or a Ray worker, rebuilds a model from the
warehouse alone: `build_model(spec, kwargs)` and `load_dataset_spec(spec)`.
A `python:` file is the user's code: it is run to build the model (and only
then), and its sha256 is checked against the one recorded at ingest each time.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import json
import math
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fgm.train.bundle import sha256_file
from fgm.warehouse import FgmError, InputError

SOURCES = ("python", "torchvision", "timm")
DATASET_SOURCES = ("npz", "torchvision")
# fgm's own loaders read these torchvision datasets (and the non-official files
# of the test data) as uint8 images; any other torchvision class with the
# (root, train=, download=) signature and .data / .targets is read the same way
TORCHVISION_DATASETS = ("CIFAR10", "CIFAR100", "MNIST", "FashionMNIST", "KMNIST", "SVHN")
HP_PREFIX = "hp."
# torchvision's and timm's keyword arguments that fetch or read weights of their own
FETCHING_KWARGS = frozenset({"weights", "weights_backbone", "pretrained", "checkpoint_path",
                             "pretrained_cfg", "pretrained_cfg_overlay", "pretrained_strict"})


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()




def confined(base: Path, name: str, what: str, source: Path) -> Path:
    """`name` (a path written in a file) resolved against `base`, which it may not
    leave (no absolute paths, no `..` out of it, no symbolic link pointing out)."""
    if not isinstance(name, str) or not name.strip() or "\x00" in name:
        raise InputError(source, f"{what}: expected a path relative to {base}, got {name!r}")
    raw = Path(name)
    if raw.is_absolute():
        raise InputError(source, f"{what}: {name!r} is an absolute path; paths are relative "
                         f"to {base} and stay inside it")
    root = base.resolve()
    full = (root / raw).resolve()
    if full != root and root not in full.parents:
        raise InputError(source, f"{what}: {name!r} leads out of {root}; paths stay inside it")
    return full


# --------------------------------------------------------------------------- architectures

def _check_kwargs(value: object, where: str, source: Path) -> None:
    """kwargs are data: TOML's strings, numbers, booleans, lists and tables."""
    if isinstance(value, dict):
        for k, v in value.items():
            _check_kwargs(v, f"{where}.{k}", source)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_kwargs(v, f"{where}[{i}]", source)
    elif isinstance(value, float) and not math.isfinite(value):
        raise InputError(source, f"{where}: {value} is not a finite number")
    elif not isinstance(value, str | int | float | bool):
        raise InputError(source, f"{where}: a {type(value).__name__} cannot be a keyword "
                         "argument here (dates and times are not); write it as text or a number")


def hp_references(value: object) -> set[str]:
    """The axes a kwargs value takes from the table ("hp.<axis>" strings)."""
    if isinstance(value, dict):
        return set().union(*(hp_references(v) for v in value.values())) if value else set()
    if isinstance(value, list):
        return set().union(*(hp_references(v) for v in value)) if value else set()
    if isinstance(value, str) and value.startswith(HP_PREFIX):
        return {value[len(HP_PREFIX):]}
    return set()


def fill_kwargs(value: object, hp: dict[str, object]) -> object:
    """kwargs with each "hp.<axis>" replaced by this model's value of the axis: a
    whole number as an int (width = "hp.width" builds with width=16, not 16.0)."""
    if isinstance(value, dict):
        return {k: fill_kwargs(v, hp) for k, v in value.items()}
    if isinstance(value, list):
        return [fill_kwargs(v, hp) for v in value]
    if isinstance(value, str) and value.startswith(HP_PREFIX):
        v = hp[value[len(HP_PREFIX):]]
        if isinstance(v, float) and v.is_integer():
            return int(v)
        if isinstance(v, str) and v.lower() in ("true", "false"):
            return v.lower() == "true"     # a flag: the text "false" would be truthy
        return v
    return value


@dataclass(frozen=True)
class Architecture:
    """One [arch.NAME] of a models.toml. `spec()` is what the warehouse stores."""
    name: str
    source: str            # as written
    kind: str              # python | torchvision | timm
    target: str            # the class (python) or the registered model name
    kwargs_json: str       # the kwargs as written, canonical JSON
    code_path: str | None = None     # python: the file, resolved
    code_sha256: str | None = None   # python: its sha256 when it was read; pgdl: the config's
    config_json: str | None = None   # pgdl: the model's config.json (ingest/pgdl.py)

    @property
    def kwargs(self) -> dict:
        return json.loads(self.kwargs_json)

    def spec(self) -> dict:
        out = {"name": self.name, "source": self.source, "kind": self.kind,
               "target": self.target, "kwargs": self.kwargs, "code_path": self.code_path,
               "code_sha256": self.code_sha256,
               "library_version": library_version(self.kind)}
        if self.config_json is not None:
            out["config"] = json.loads(self.config_json)
        return out



def arch_id(spec: dict) -> str:
    """An architecture's id: its source, kwargs, the sha256 of its file and of the files
    of its folder that it imports, and the library version (not its name, nor where
    the file lies)."""
    key = json.dumps({"source": f"{spec['kind']}:{spec['target']}", "kwargs": spec["kwargs"],
                      "code_sha256": spec["code_sha256"],
                      "imports": sorted((spec.get("imports") or {}).values()),
                      "library_version": spec.get("library_version")}, sort_keys=True)
    return sha256_bytes(key.encode())[:16]


def parse_architecture(name: str, entry: object, toml_path: Path) -> Architecture:
    where = f"[arch.{name}]"
    if not isinstance(entry, dict):
        raise InputError(toml_path, f"{where}: expected a table with source and kwargs")
    unknown = sorted(set(entry) - {"source", "kwargs"})
    if unknown:
        raise InputError(toml_path, f"{where}: unknown key{'s' * (len(unknown) > 1)} "
                         f"{', '.join(unknown)}; an architecture has source and kwargs")
    source = entry.get("source")
    if not isinstance(source, str):
        raise InputError(toml_path, f"{where}: source is required: \"python:FILE.py:CLASS\", "
                         "\"torchvision:NAME\" or \"timm:NAME\"")
    kind, _, rest = source.partition(":")
    if kind not in SOURCES or not rest:
        raise InputError(toml_path, f"{where}: source {source!r}: expected "
                         "\"python:FILE.py:CLASS\", \"torchvision:NAME\" or \"timm:NAME\"")
    kwargs = entry.get("kwargs", {})
    if not isinstance(kwargs, dict):
        raise InputError(toml_path, f"{where}: kwargs must be a table, e.g. "
                         "kwargs = { num_classes = 10 }")
    _check_kwargs(kwargs, f"{where} kwargs", toml_path)
    if kind in ("torchvision", "timm"):
        fetch = sorted(set(kwargs) & FETCHING_KWARGS)
        if fetch:
            raise InputError(toml_path, f"{where}: kwargs {', '.join(fetch)} would download "
                             "or read weights of their own; the weights are the table's "
                             "checkpoints")
    code_path = code_sha = None
    if kind == "python":
        file, sep, target = rest.rpartition(":")
        if not sep or not file or not target.isidentifier():
            raise InputError(toml_path, f"{where}: source {source!r}: expected "
                             "\"python:FILE.py:CLASS\" (a file relative to this TOML, then "
                             "the class or function that builds the model)")
        path = confined(toml_path.parent, file, f"{where} source", toml_path)
        if not path.is_file():
            raise InputError(toml_path, f"{where}: {path}: no such file")
        code_path, code_sha = str(path), sha256_file(path)
    else:
        target = rest
    return Architecture(name, source, kind, target, json.dumps(kwargs, sort_keys=True),
                        code_path, code_sha)


_user_modules: dict[tuple[str, str], tuple[object, dict[str, str]]] = {}


def _local_modules(folder: Path) -> dict[str, object]:
    """Modules of sys.modules whose file lies in `folder` or below it."""
    out = {}
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if file:
            try:
                if Path(file).resolve().is_relative_to(folder):
                    out[name] = module
            except (OSError, ValueError):
                continue
    return out


def _user_module(path: str, sha: str) -> tuple[object, dict[str, str]]:
    """The user's file, run once per process per content (cached by its path and
    sha256), and the files of its folder it imported, {path: sha256}. Those modules
    are taken out of sys.modules again, so that another architecture's file of the
    same folder name imports its own neighbours, not these."""
    key = (path, sha)
    if key not in _user_modules:
        module_name = f"fgm_user_{sha[:16]}"
        spec = importlib.util.spec_from_file_location(module_name, path)
        if spec is None or spec.loader is None:
            raise FgmError(f"{path}: cannot be loaded as Python")
        module = importlib.util.module_from_spec(spec)
        folder = Path(path).parent.resolve()
        before = set(_local_modules(folder))
        sys.path.insert(0, str(folder))       # so that it may import its neighbours
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except (Exception, SystemExit) as exc:
            sys.modules.pop(module_name, None)
            what = f"called sys.exit({exc.code!r})" if isinstance(exc, SystemExit) else \
                f"raised {type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
            raise FgmError(f"{path}: running it {what} (it is run to build the model: a "
                           "file that parses a command line at import cannot be)") from None
        finally:
            if sys.path and sys.path[0] == str(folder):
                sys.path.pop(0)
            imported = {n: m for n, m in _local_modules(folder).items()
                        if n not in before and n != module_name}
            for name in imported:
                sys.modules.pop(name, None)
        files = {str(Path(m.__file__).resolve()): sha256_file(Path(m.__file__))
                 for m in imported.values()}
        _user_modules[key] = (module, files)
    return _user_modules[key]


def user_imports(spec: dict) -> dict[str, str]:
    """The files of a python: architecture's folder that its file imports, with their
    sha256 ({} for torchvision and timm): recorded at ingest, checked at each build."""
    if spec["kind"] != "python":
        return {}
    return dict(_user_module(spec["code_path"], spec["code_sha256"])[1])


def builder(spec: dict):
    """The callable that builds the architecture (not yet called). FgmError with
    what is wrong: a file changed since ingest, a name nobody knows."""
    kind, target = spec["kind"], spec["target"]
    if kind == "python":
        path = Path(spec["code_path"])
        if not path.is_file():
            raise FgmError(f"architecture {spec['name']!r}: {path}: no such file (moved? "
                           "ingest the table again)")
        now = sha256_file(path)
        if now != spec["code_sha256"]:
            raise FgmError(f"architecture {spec['name']!r}: {path} changed since it was "
                           f"ingested (sha256 {spec['code_sha256'][:16]}… then, {now[:16]}… "
                           "now): the stored models may not be what it builds. Ingest the "
                           "table again (a changed architecture is a new one)")
        module, imports = _user_module(str(path), now)
        for file, sha in (spec.get("imports") or {}).items():
            current = sha256_file(Path(file)) if Path(file).is_file() else None
            if current != sha:
                raise FgmError(f"architecture {spec['name']!r}: {file}, which {path.name} "
                               f"imports, changed since it was ingested (sha256 {sha[:16]}… "
                               f"then, {(current or 'no file')[:16]}… now). Ingest the table "
                               "again (a changed architecture is a new one)")
        if spec.get("imports") is not None and set(imports) != set(spec["imports"]):
            raise FgmError(f"architecture {spec['name']!r}: {path.name} imports other files "
                           f"of its folder than when it was ingested ("
                           f"{', '.join(sorted(set(imports) ^ set(spec['imports'])))})")
        fn = getattr(module, target, None)
        if not callable(fn):
            names = [n for n in vars(module) if not n.startswith("_")]
            close = difflib.get_close_matches(target, names, n=1)
            raise FgmError(f"architecture {spec['name']!r}: {path} has no class or function "
                           f"{target!r}" + (f"; did you mean {close[0]!r}?" if close else ""))
        return fn
    if kind == "torchvision":
        import torchvision
        known = torchvision.models.list_models()
        if target not in known:
            close = difflib.get_close_matches(target, known, n=3)
            raise FgmError(f"architecture {spec['name']!r}: torchvision has no model "
                           f"{target!r}" + (f"; did you mean {', '.join(close)}?" if close
                                            else "; see torchvision.models.list_models()"))
        _check_version(spec, "torchvision", torchvision.__version__)
        return lambda **kw: torchvision.models.get_model(target, weights=None, **kw)
    if kind == "pgdl":
        from .keras import KerasSequential
        config = spec["config"]
        now = sha256_bytes(json.dumps(config, sort_keys=True).encode())
        if now != spec["code_sha256"]:
            raise FgmError(f"architecture {spec['name']!r}: its stored config does not match "
                           "its sha256")
        return lambda **kw: KerasSequential(config["model_config"], config["input_shape"])
    if kind == "timm":
        try:
            import timm
        except ImportError:
            raise FgmError(f"architecture {spec['name']!r}: timm is not installed "
                           "(pip install timm)") from None
        if not timm.is_model(target):
            close = difflib.get_close_matches(target, timm.list_models(), n=3)
            raise FgmError(f"architecture {spec['name']!r}: timm has no model {target!r}"
                           + (f"; did you mean {', '.join(close)}?" if close else ""))
        _check_version(spec, "timm", timm.__version__)
        return lambda **kw: timm.create_model(target, pretrained=False, **kw)
    raise FgmError(f"architecture {spec['name']!r}: unknown source kind {kind!r}")


def library_version(kind: str) -> str | None:
    """The version of the library a torchvision: or timm: architecture comes from."""
    try:
        if kind == "torchvision":
            import torchvision
            return torchvision.__version__
        if kind == "timm":
            import timm
            return timm.__version__
    except ImportError:
        return None
    return None


def _check_version(spec: dict, library: str, now: str) -> None:
    """A library other than the one an architecture was ingested with may build
    another network under the same name (the checkpoint's keys and shapes are
    checked; its forward is not): refused, naming both versions."""
    then = spec.get("library_version")
    if then is not None and then != now:
        raise FgmError(f"architecture {spec['name']!r}: ingested with {library} {then}, "
                       f"this is {library} {now}; its models may not be the networks they "
                       f"were. Install {library}=={then}, or ingest the table again")


def build_model(spec: dict, kwargs: dict):
    """A fresh module of the architecture with this model's kwargs."""
    import torch.nn as nn
    fn = builder(spec)
    try:
        model = fn(**kwargs)
    except SystemExit as exc:
        raise FgmError(f"architecture {spec['name']!r}: building it called sys.exit("
                       f"{exc.code!r})") from None
    except Exception as exc:   # the user's constructor: any error is the kwargs' fault
        raise FgmError(f"architecture {spec['name']!r}: building it with "
                       f"{json.dumps(kwargs, sort_keys=True)[:200]} raised "
                       f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}") from None
    if not isinstance(model, nn.Module):
        raise FgmError(f"architecture {spec['name']!r}: {spec['target']} returned a "
                       f"{type(model).__name__}, not a torch.nn.Module")
    return model


# --------------------------------------------------------------------------- checkpoints

SAVE_STATE_DICT = ("save the state dict instead: torch.save(model.state_dict(), PATH), or "
                   "safetensors.torch.save_file(model.state_dict(), PATH)")


def read_state_dict(path: Path) -> dict:
    """A state dict from a .safetensors file, or a .pt/.pth/.bin file loaded with
    weights_only=True (never unpickling objects). FgmError says why not."""
    import torch
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise FgmError(f"{path}: not a readable safetensors file "
                           f"({' '.join(str(exc).split())[:200]})") from None
    if suffix not in (".pt", ".pth", ".bin", ".ckpt"):
        raise FgmError(f"{path}: expected a .safetensors or .pt/.pth state dict")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:   # UnpicklingError for objects weights_only refuses
        text = " ".join(str(exc).split())
        if _looks_like_safetensors(path):
            raise FgmError(f"{path}: a safetensors file under a {suffix} name: rename it "
                           "to .safetensors") from None
        if "weights_only" in text or "Unsupported global" in text:
            raise FgmError(f"{path}: holds pickled objects (a whole model?), which fgm does "
                           f"not unpickle; {SAVE_STATE_DICT}") from None
        raise FgmError(f"{path}: not a readable PyTorch file ({text[:200]})") from None
    if not isinstance(state, dict) or not state:
        raise FgmError(f"{path}: holds a {type(state).__name__}, not a state dict; "
                       f"{SAVE_STATE_DICT}")
    bad = [k for k, v in state.items() if not isinstance(k, str) or not torch.is_tensor(v)]
    if bad:
        raise FgmError(f"{path}: not a plain state dict (entries that are not tensors: "
                       f"{', '.join(map(str, bad[:5]))}); {SAVE_STATE_DICT}")
    odd = [k for k, v in state.items() if v.layout != torch.strided or v.is_quantized]
    if odd:
        raise FgmError(f"{path}: sparse or quantized tensors ({', '.join(odd[:5])}): fgm "
                       "reads dense float weights; save the float model's state dict")
    return state


def _looks_like_safetensors(path: Path) -> bool:
    """An 8-byte little-endian header length, then a JSON header."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 10**8


def load_weights(model, path: Path) -> None:
    """The file's state dict into `model`, every key and shape matching (FgmError
    names the missing, unexpected and misshapen keys)."""
    import torch
    if Path(path).suffix.lower() in (".hdf5", ".h5") and hasattr(model, "keras_state_dict"):
        state = model.keras_state_dict(Path(path))     # a PGDL model's Keras weights
    else:
        state = read_state_dict(path)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} (the model's: {tuple(own[k].shape)})"
              for k in own if k in state and state[k].shape != own[k].shape]
    # a float parameter from integers or booleans, or from complex numbers (whose
    # imaginary part load_state_dict would drop), is not these weights
    kinds = [f"{k} {state[k].dtype} (the model's: {own[k].dtype})" for k in own if k in state
             and (state[k].is_complex() or state[k].is_floating_point()
                  != own[k].is_floating_point())]
    if missing or unexpected or shapes or kinds:
        parts = []
        for label, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                            ("shapes that differ", shapes), ("dtypes that differ", kinds)):
            if keys:
                more = f" and {len(keys) - 5} more" if len(keys) > 5 else ""
                parts.append(f"{label}: {', '.join(keys[:5])}{more}")
        raise FgmError(f"{path}: does not fit the architecture ({'; '.join(parts)})")
    for k, v in state.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise FgmError(f"{path}: {k} has values that are not finite")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise FgmError(f"{path}: does not load into the architecture "
                       f"({' '.join(str(exc).split())[:300]})") from None


# --------------------------------------------------------------------------- datasets

@dataclass(frozen=True)
class DatasetDef:
    """One [dataset.NAME] of a models.toml. `spec()` is what the warehouse stores."""
    name: str
    source: str                 # as written
    kind: str                   # npz | torchvision
    location: str               # npz: the file, resolved; torchvision: the root
    target: str | None          # torchvision: the class
    mean: tuple[float, ...]
    std: tuple[float, ...]
    layout: str | None          # npz: "NCHW" | "NHWC" | None (inferred)
    download: bool = False
    shards: tuple[str, ...] = ()    # tfrecord (a PGDL task): the shard files, in order

    def spec(self) -> dict:
        out = {"name": self.name, "source": self.source, "kind": self.kind,
               "location": self.location, "target": self.target, "mean": list(self.mean),
               "std": list(self.std), "layout": self.layout, "download": self.download}
        if self.shards:
            out["shards"] = list(self.shards)
        return out


def _floats(entry: dict, key: str, where: str, toml_path: Path, positive: bool) -> tuple:
    value = entry.get(key)
    if isinstance(value, int | float) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list) or not value or not all(
            isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
            for v in value):
        raise InputError(toml_path, f"{where}: {key} is required: one number per channel, "
                         f"as the model was trained (e.g. {key} = "
                         f"{'[0.25, 0.25, 0.25]' if positive else '[0.5, 0.5, 0.5]'}; "
                         f"{'[1, 1, 1]' if positive else '[0, 0, 0]'} for none)")
    if positive and any(v <= 0 for v in value):
        raise InputError(toml_path, f"{where}: {key} must be positive, got {value}")
    return tuple(float(v) for v in value)


OWN_DATASETS = ("digits", "cifar10", "svhn", "fashion_mnist")


def parse_dataset(name: str, entry: object, toml_path: Path) -> DatasetDef:
    where = f"[dataset.{name}]"
    if name in OWN_DATASETS:
        raise InputError(toml_path, f"{where}: {name!r} is one of fgm's own datasets "
                         f"({', '.join(OWN_DATASETS)}), whose preprocessing is fgm's; give "
                         "yours another name")
    if not isinstance(entry, dict):
        raise InputError(toml_path, f"{where}: expected a table with source, mean and std")
    allowed = {"source", "mean", "std", "layout", "root", "download"}
    unknown = sorted(set(entry) - allowed)
    if unknown:
        raise InputError(toml_path, f"{where}: unknown key{'s' * (len(unknown) > 1)} "
                         f"{', '.join(unknown)}; expected {', '.join(sorted(allowed))}")
    source = entry.get("source")
    kind, _, rest = source.partition(":") if isinstance(source, str) else ("", "", "")
    if kind not in DATASET_SOURCES or not rest:
        raise InputError(toml_path, f"{where}: source {source!r}: expected \"npz:FILE.npz\" "
                         "or \"torchvision:CLASS\" (e.g. torchvision:CIFAR10)")
    mean = _floats(entry, "mean", where, toml_path, positive=False)
    std = _floats(entry, "std", where, toml_path, positive=True)
    if len(mean) != len(std):
        raise InputError(toml_path, f"{where}: mean has {len(mean)} numbers and std "
                         f"{len(std)}: one per channel each")
    layout = entry.get("layout")
    if layout is not None and layout not in ("NCHW", "NHWC"):
        raise InputError(toml_path, f"{where}: layout {layout!r}: expected \"NCHW\" or "
                         "\"NHWC\"")
    download = entry.get("download", False)
    if not isinstance(download, bool):
        raise InputError(toml_path, f"{where}: download must be true or false")
    if kind == "npz":
        if "root" in entry or download:
            raise InputError(toml_path, f"{where}: root and download are for torchvision "
                             "sources; an npz file is named by source")
        path = confined(toml_path.parent, rest, f"{where} source", toml_path)
        if not path.is_file():
            raise InputError(toml_path, f"{where}: {path}: no such file")
        return DatasetDef(name, source, "npz", str(path), None, mean, std, layout)
    if layout is not None:
        raise InputError(toml_path, f"{where}: layout is for npz files; torchvision's "
                         "datasets have theirs")
    if rest not in TORCHVISION_DATASETS:
        close = difflib.get_close_matches(rest, TORCHVISION_DATASETS, n=1)
        raise InputError(toml_path, f"{where}: torchvision dataset {rest!r} is not one fgm "
                         f"reads ({', '.join(TORCHVISION_DATASETS)})"
                         + (f"; did you mean {close[0]!r}?" if close else ""))
    root = entry.get("root")
    if not isinstance(root, str) or not root.strip():
        raise InputError(toml_path, f"{where}: root is required for a torchvision source: "
                         "the folder that holds (or is to hold, with download = true) it")
    folder = Path(root).expanduser()
    if not folder.is_absolute():
        folder = toml_path.parent.resolve() / folder
    return DatasetDef(name, source, "torchvision", str(folder), rest, mean, std, None, download)


def _channel_axis(x: np.ndarray, channels: int, layout: str | None, where: str) -> np.ndarray:
    """Images as (N, C, H, W), the channel axis given by `layout` or found by the
    number of channels mean and std give (refused where both axes could be it)."""
    if x.ndim == 3:
        x = x[:, None]
        layout = "NCHW"
    if x.ndim != 4:
        raise FgmError(f"{where}: images must be (N, H, W), (N, C, H, W) or (N, H, W, C); "
                       f"got shape {x.shape}")
    if layout is None:
        first, last = x.shape[1] == channels, x.shape[3] == channels
        if not first and not last:
            raise FgmError(f"{where}: images of shape {x.shape} have no axis of "
                           f"{channels} channel{'s' * (channels > 1)}, as many as mean and "
                           "std give numbers: give one number per channel")
        if first and last:
            raise FgmError(f"{where}: cannot tell the channel axis of images of shape "
                           f"{x.shape} with {channels} channel{'s' * (channels > 1)} (mean, "
                           "std): write layout = \"NCHW\" or \"NHWC\" in the dataset's table")
        layout = "NCHW" if first else "NHWC"
    if layout == "NHWC":
        x = x.transpose(0, 3, 1, 2)
    if x.shape[1] != channels:
        raise FgmError(f"{where}: images of shape {x.shape} ({layout}) have {x.shape[1]} "
                       f"channels, but mean and std give {channels}")
    return x


def _scaled(x: np.ndarray, where: str) -> np.ndarray:
    if x.dtype == np.uint8:
        return x.astype(np.float32) / 255.0
    if x.dtype.kind == "f":
        x = x.astype(np.float32)
        if not np.isfinite(x).all():
            raise FgmError(f"{where}: the images have values that are not finite")
        return x
    raise FgmError(f"{where}: images of dtype {x.dtype}: expected uint8 (scaled to [0, 1]) "
                   "or float32")


def _labels(y: np.ndarray, n: int, where: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1 or len(y) != n:
        raise FgmError(f"{where}: labels of shape {y.shape} for {n} images: expected ({n},)")
    if y.dtype.kind not in "iu":
        if y.dtype.kind == "f" and np.isfinite(y).all() and (y == np.round(y)).all():
            y = y.astype(np.int64)
        else:
            raise FgmError(f"{where}: labels must be whole numbers (dtype {y.dtype})")
    if len(y) and int(y.min()) < 0:
        raise FgmError(f"{where}: a label is negative ({int(y.min())})")
    return y.astype(np.int64)


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    import zipfile
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in z]
            if missing:
                raise FgmError(f"{path}: no {', '.join(missing)} in it; an npz dataset holds "
                               f"x_train, y_train, x_test, y_test (found: "
                               f"{', '.join(z.files) or 'nothing'})")
            return {k: z[k] for k in ("x_train", "y_train", "x_test", "y_test")}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise FgmError(f"{path}: not a readable npz file "
                       f"({' '.join(str(exc).split())[:200]})") from None


def _torchvision_arrays(spec: dict) -> dict[str, np.ndarray]:
    """uint8 images and labels of a torchvision dataset, through fgm's loaders where
    it has one (they also read non-official files of the same layout)."""
    from fgm.train import data as fgm_data
    root, target = Path(spec["location"]), spec["target"]
    own = {"CIFAR10": fgm_data.load_cifar10, "SVHN": fgm_data.load_svhn,
           "FashionMNIST": fgm_data.load_fashion_mnist}
    if target in own:
        d = own[target](root, spec.get("download", False))
        xs = d.raw
        return {"x_train": xs[0].numpy(), "y_train": d.y_train.numpy(),
                "x_test": xs[1].numpy(), "y_test": d.y_test.numpy(), "layout": "NCHW"}
    import torchvision
    cls = getattr(torchvision.datasets, target)
    try:
        parts = [cls(str(root), train=flag, download=spec.get("download", False))
                 for flag in (True, False)]
    except RuntimeError as exc:
        raise FgmError(f"{root}: no {target} here ({exc}); set root, or download = true"
                       ) from None
    out = {}
    for part, split in zip(parts, ("train", "test"), strict=True):
        x = np.asarray(part.data)
        out[f"x_{split}"], out[f"y_{split}"] = x, np.asarray(part.targets)
    out["layout"] = "NHWC"
    return out


def _tfrecord_arrays(spec: dict) -> dict[str, np.ndarray]:
    """A PGDL task's training shards (ingest/pgdl.py): float32 NHWC images and their
    labels, in the order of the shards named in the spec; no test set (the
    competition's tasks give the training set only)."""
    from .tfrecord import read_examples
    images, labels = [], []
    for shard in spec["shards"]:
        for index, record in enumerate(read_examples(Path(shard), ("inputs", "output"))):
            image, label = record["inputs"], record["output"]
            # as the competition's loader reads them: float32 images, integer labels
            if image.dtype != np.float32 or label.dtype.kind not in "iu" or label.size != 1:
                raise FgmError(f"{shard}, record {index}: expected a float32 image and one "
                               f"integer label, found {image.dtype} {image.shape} and "
                               f"{label.dtype} {label.shape}")
            images.append(image)
            labels.append(int(label.reshape(())))
    if not images:
        raise FgmError(f"dataset {spec['name']!r}: its shards hold no records")
    shapes = {i.shape for i in images}
    if len(shapes) > 1:
        raise FgmError(f"dataset {spec['name']!r}: images of several shapes "
                       f"({', '.join(map(str, sorted(shapes)))})")
    x = np.stack(images)
    y = np.asarray(labels, dtype=np.int64)
    return {"x_train": x, "y_train": y, "x_test": x[:0], "y_test": y[:0]}


def dataset_arrays(spec: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, str]:
    """(x_train, y_train, x_test, y_test) normalised as the spec says: float32 NCHW
    images, int64 labels; and the sha256 of the arrays as read (before scaling)."""
    where = f"dataset {spec['name']!r} ({spec['source']})"
    if spec["kind"] == "npz":
        arrays = _read_npz(Path(spec["location"]))
        layout = spec.get("layout")
    elif spec["kind"] == "tfrecord":
        arrays = _tfrecord_arrays(spec)
        layout = "NHWC"
    else:
        arrays = _torchvision_arrays(spec)
        layout = arrays.pop("layout")
    digest = hashlib.sha256()
    for key in ("x_train", "y_train", "x_test", "y_test"):
        a = np.ascontiguousarray(arrays[key])
        digest.update(f"{key}:{a.dtype.str}:{a.shape}".encode())
        digest.update(a.tobytes())
    mean = np.asarray(spec["mean"], np.float32)[None, :, None, None]
    std = np.asarray(spec["std"], np.float32)[None, :, None, None]
    out = []
    for split in ("train", "test"):
        x = _channel_axis(np.asarray(arrays[f"x_{split}"]), len(spec["mean"]), layout,
                          f"{where}, x_{split}")
        x = (_scaled(x, f"{where}, x_{split}") - mean) / std
        y = _labels(arrays[f"y_{split}"], len(x), f"{where}, y_{split}")
        if len(x) == 0 and (split == "train" or spec["kind"] != "tfrecord"):
            raise FgmError(f"{where}: x_{split} has no images")
        out += [np.ascontiguousarray(x, dtype=np.float32), y]
    if out[0].shape[1:] != out[2].shape[1:]:
        raise FgmError(f"{where}: training images {out[0].shape[1:]} and test images "
                       f"{out[2].shape[1:]} differ in shape")
    return (*out, digest.hexdigest())


def load_dataset_spec(spec: dict, expected_sha256: str | None = None):
    """The dataset as fgm's Data (float32 NCHW, normalised as the spec says). With
    `expected_sha256`, data that changed since ingest are refused with both hashes."""
    import torch

    from fgm.train.data import Data
    x_train, y_train, x_test, y_test, digest = dataset_arrays(spec)
    if expected_sha256 is not None and digest != expected_sha256:
        raise FgmError(f"dataset {spec['name']!r} ({spec['source']}) changed since it was "
                       f"ingested (sha256 {expected_sha256[:16]}… then, {digest[:16]}… now): "
                       "its models' measures would not be on their training data")
    classes = int(max(y_train.max(), y_test.max() if len(y_test) else 0)) + 1
    info = {"source": spec["source"], "train_size": len(x_train), "test_size": len(x_test),
            "split": "as given", "augmentation": "none", "mean": spec["mean"],
            "std": spec["std"], "sha256": digest}
    return Data(spec["name"], torch.from_numpy(x_train), torch.from_numpy(y_train),
                torch.from_numpy(x_test), torch.from_numpy(y_test), classes, info)


def dataset_id(spec: dict, digest: str) -> str:
    """A dataset's id: its arrays' sha256 and its preprocessing (not where it lies)."""
    key = json.dumps({"sha256": digest, "mean": spec["mean"], "std": spec["std"],
                      "layout": spec.get("layout")}, sort_keys=True)
    return sha256_bytes(key.encode())[:16]


# --------------------------------------------------------------------------- models.toml

@dataclass
class ModelsToml:
    path: Path
    architectures: dict[str, Architecture]
    datasets: dict[str, DatasetDef]


def read_models_toml(path: Path) -> ModelsToml:
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no such file")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise InputError(path, f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        raise InputError(path, f"not valid TOML: {exc}") from None
    unknown = sorted(set(data) - {"arch", "dataset"})
    if unknown:
        raise InputError(path, f"unknown table{'s' * (len(unknown) > 1)} "
                         f"{', '.join(unknown)}; expected [arch.NAME] and [dataset.NAME]")
    arch, ds = data.get("arch", {}), data.get("dataset", {})
    if not isinstance(arch, dict) or not arch:
        raise InputError(path, "no architectures: expected at least one [arch.NAME] with "
                         "source = \"python:FILE.py:CLASS\", \"torchvision:NAME\" or "
                         "\"timm:NAME\"")
    if not isinstance(ds, dict):
        raise InputError(path, "dataset: expected [dataset.NAME] tables")
    return ModelsToml(path, {n: parse_architecture(n, e, path) for n, e in arch.items()},
                      {n: parse_dataset(n, e, path) for n, e in ds.items()})


class NotAClassifier(FgmError):
    """The model's output is not (images, classes); `detail` says what it is."""

    def __init__(self, where: str, detail: str):
        super().__init__(f"{where}: {detail}")
        self.detail = detail


def classifier_classes(model, x, labels: list, where: str) -> int:
    """How many classes `model` outputs for images `x` (two are run, in eval mode):
    FgmError where the images do not fit it or a label of `labels` is outside its
    classes, NotAClassifier where its output is not (2, classes). fgm-ingest --models
    and fgm.measure check a model with it."""
    import torch
    model.eval()
    try:
        with torch.no_grad():
            out = model(x[:2])
    except Exception as exc:   # the model's own forward: any error is the input's fit
        raise FgmError(f"{where}: images of shape {tuple(x.shape[1:])} do not fit the model "
                       f"({type(exc).__name__}: {' '.join(str(exc).split())[:300]})") from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[1] < 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise NotAClassifier(where, f"not an image classifier: its output for 2 images is "
                                    f"{shape}, where (2, classes) was expected")
    classes = int(out.shape[1])
    for y in labels:
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= classes):
            raise FgmError(f"{where}: labels must be in [0, {classes}) for a model of "
                           f"{classes} classes; found {int(y.min())} to {int(y.max())}")
    return classes
