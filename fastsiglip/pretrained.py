"""transformers' model API on fastsiglip's model classes (model.py mixes this in).

    model.save_pretrained("out")                        # config.json + model.safetensors
    fastsiglip.SiglipModel.from_pretrained("out")       # = fastsiglip.load("out")
    transformers.AutoModel.from_pretrained("out")       # the same weights in transformers
    model.push_to_hub("me/my-siglip")                   # huggingface_hub
    model.dtype, model.device, model.config.to_dict()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

Also the calling convention (`positional`): transformers' positional order per family, and
`return_dict`. Never imports transformers; imports loading lazily (loading imports model).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import pathlib
import tempfile

import torch
import torch.utils.checkpoint

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def positional(fixres: tuple[str, ...], naflex: tuple[str, ...]):
    """Bind positional arguments in transformers' order for the model's family.

    transformers' SigLIP classes (FixRes: SiglipModel & co) and SigLIP 2 classes (NaFlex:
    Siglip2Model & co) take different arguments in different positional orders; one fastsiglip
    class serves both, so the order is picked from `self.config.naflex`. Past that order,
    arguments are keyword-only: a longer positional call is an error, never a silent binding.
    """

    def wrap(method):
        @functools.wraps(method)
        def bound(self, *args, **kwargs):
            if args:
                order = naflex if self.config.naflex else fixres
                family = "NaFlex (Siglip2*)" if self.config.naflex else "FixRes (Siglip*)"
                where = f"{type(self).__name__}.{method.__name__}"
                if len(args) > len(order):
                    raise TypeError(f"{where} takes at most {len(order)} positional arguments, transformers' order "
                                    f"for {family} models ({', '.join(order)}); got {len(args)}: pass the others "
                                    "by keyword")
                for name, value in zip(order, args):
                    if name in kwargs:
                        raise TypeError(f"{where} got {name!r} both by position and by keyword")
                    kwargs[name] = value
            return method(self, **kwargs)

        return bound

    return wrap


def as_returned(output, return_dict):
    """transformers' return_dict: the output object (None or True), or its to_tuple() (False)."""
    if return_dict is None or return_dict is True:
        return output
    if return_dict is False:
        return output.to_tuple()
    raise TypeError(f"return_dict must be True, False or None, got {return_dict!r}")


def _atomic_write(path: pathlib.Path, write) -> None:
    """write(tmp) into a temporary file beside `path`, fsync, then rename over `path`."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class PreTrainedModelMixin:
    """save_pretrained / from_pretrained / push_to_hub, dtype, device and gradient checkpointing,
    as transformers' PreTrainedModel offers them, for a module with a `config` (ModelConfig)."""

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the first floating-point parameter (transformers' rule)."""
        first = None
        for p in self.parameters():
            first = first if first is not None else p
            if p.is_floating_point():
                return p.dtype
        return first.dtype if first is not None else torch.get_default_dtype()

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """Parameter count, as transformers' (Trainer logs it): trainable ones only, or without
        the nn.Embedding tables."""
        skip = set()
        if exclude_embeddings:
            skip = {id(m.weight) for m in self.modules() if isinstance(m, torch.nn.Embedding)}
        return sum(p.numel() for p in self.parameters() if (p.requires_grad or not only_trainable) and id(p) not in skip)

    # -- checkpoints --------------------------------------------------------------------------

    def save_pretrained(self, save_directory, *, state_dict: dict | None = None, safe_serialization: bool = True,
                        is_main_process: bool = True, push_to_hub: bool = False, **hub_kwargs) -> None:
        """Write `save_directory`/config.json and model.safetensors in transformers' layout, each
        atomically (a temporary file renamed in place): transformers' from_pretrained (and
        fastsiglip.load) reads the folder. `state_dict` replaces the model's own (keys must be
        transformers'); `push_to_hub=True` then uploads the folder (push_to_hub's arguments)."""
        if not safe_serialization:
            raise ValueError("fastsiglip writes safetensors only (safe_serialization=True); "
                             "torch.load-able .bin files are not supported")
        folder = pathlib.Path(save_directory)
        if folder.is_file():
            raise ValueError(f"save_directory {str(folder)!r} is a file; pass a folder")
        if not is_main_process:
            return
        folder.mkdir(parents=True, exist_ok=True)
        from safetensors.torch import save_file

        state = self.state_dict() if state_dict is None else state_dict
        tensors = {k: v.detach().contiguous() for k, v in state.items()}  # every key its own storage
        _atomic_write(folder / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
        config = dict(self.config.to_dict(), dtype=str(self.dtype).removeprefix("torch."))
        text = json.dumps(config, indent=2, sort_keys=True) + "\n"
        _atomic_write(folder / CONFIG_FILE, lambda tmp: pathlib.Path(tmp).write_text(text))
        if push_to_hub:
            repo_id = hub_kwargs.pop("repo_id", None) or folder.name
            self._upload(folder, repo_id, **hub_kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *, device=None, dtype=None, torch_dtype=None,
                        revision: str | None = None, cache_dir=None, local_files_only: bool | None = None):
        """fastsiglip.load(...), which must give this class (`torch_dtype` is transformers' old
        name of `dtype`)."""
        from .loading import load

        if torch_dtype is not None:
            if dtype is not None:
                raise TypeError("pass dtype or torch_dtype, not both")
            dtype = torch_dtype
        model = load(pretrained_model_name_or_path, device=device, dtype=dtype, revision=revision,
                     cache_dir=cache_dir, local_files_only=local_files_only)
        if not isinstance(model, cls):
            raise ValueError(f"{pretrained_model_name_or_path} holds a {type(model).__name__} "
                             f"({model.config.architecture} in its config.json), not a {cls.__name__}: load it with "
                             f"fastsiglip.load or {type(model).__name__}.from_pretrained")
        return model

    def push_to_hub(self, repo_id: str, *, commit_message: str | None = None, private: bool | None = None,
                    token=None, revision: str | None = None, create_pr: bool = False):
        """save_pretrained into a temporary folder, then upload it to the hub repo `repo_id`
        (created if missing) through huggingface_hub; returns upload_folder's commit info."""
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp)
            return self._upload(pathlib.Path(tmp), repo_id, commit_message=commit_message, private=private,
                                token=token, revision=revision, create_pr=create_pr)

    def _upload(self, folder: pathlib.Path, repo_id: str, *, commit_message=None, private=None, token=None,
                revision=None, create_pr=False):
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        repo = api.create_repo(repo_id, private=private, exist_ok=True)
        return api.upload_folder(repo_id=repo.repo_id, folder_path=str(folder), revision=revision,
                                 commit_message=commit_message or f"Upload {type(self).__name__}",
                                 create_pr=create_pr)

    # -- activation checkpointing -------------------------------------------------------------

    def _layers(self) -> list:
        from .layers import EncoderLayer

        return [m for m in self.modules() if isinstance(m, EncoderLayer)]

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None,
                                        every_n_layers: int = 1, offload: bool = False) -> None:
        """Keep only the inputs of the encoder layers and recompute each in backward (less memory,
        about one more forward of compute), in training mode; as transformers' PreTrainedModel:
        `every_n_layers` checkpoints layers 0, n, 2n, ... counted over both towers in module
        order; `offload` keeps the saved inputs in (pinned) host memory;
        `activation_checkpointing_kwargs` go to torch.utils.checkpoint.checkpoint, use_reentrant
        False unless given (works with torch.compile and with inputs that need no gradient)."""
        given = activation_checkpointing_kwargs
        if given is not None and not isinstance(given, dict):
            raise TypeError(f"activation_checkpointing_kwargs must be a dict, got {type(given).__name__}")
        if not isinstance(every_n_layers, int) or isinstance(every_n_layers, bool) or every_n_layers < 1:
            raise ValueError(f"every_n_layers must be a positive int, got {every_n_layers!r}")
        kwargs = {"use_reentrant": False, **(given or {})}

        def checkpoint(function, *args):
            offloading = torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available())
            with offloading if offload else contextlib.nullcontext():
                return torch.utils.checkpoint.checkpoint(function, *args, **kwargs)

        for index, layer in enumerate(self._layers()):
            layer.gradient_checkpointing = index % every_n_layers == 0
            layer._gradient_checkpointing_func = checkpoint
        for module in self.modules():
            if hasattr(module, "layers") and hasattr(module, "gradient_checkpointing"):  # layers.Encoder
                module.gradient_checkpointing = True

    def activation_checkpointing_disable(self) -> None:
        for module in self.modules():
            if hasattr(module, "gradient_checkpointing"):
                module.gradient_checkpointing = False

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, every_n_layers: int = 1,
                                      offload: bool = False) -> None:
        """transformers' older name of activation_checkpointing_enable (Trainer calls it on models
        that are not PreTrainedModel)."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, every_n_layers, offload)

    def gradient_checkpointing_disable(self) -> None:
        self.activation_checkpointing_disable()

    @property
    def is_activation_checkpointing(self) -> bool:
        return any(layer.gradient_checkpointing for layer in self._layers())

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.is_activation_checkpointing

    @property
    def supports_gradient_checkpointing(self) -> bool:
        return True
