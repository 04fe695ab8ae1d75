"""The one autotune decorator of the kernel files: triton.autotune on a GPU, no timing in the
interpreter.

Under TRITON_INTERPRET=1 there is nothing to time (and no GPU driver to time with), yet
triton.autotune times the configs its prune function keeps whenever the kernel lists more than
one: triton 3.6 and older even when the prune function keeps a single config, which asks for a
driver (`RuntimeError: 0 active drivers`); triton 3.8 and newer skip the timing for one kept
config. So in the interpreter the autotuner is a FirstKeptConfig: it runs the prune function
exactly as triton would, takes the first config it keeps, records it as `best_config` (the tests
read it), and launches, without benchmarking, on every triton from 3.2 up. On a GPU nothing
changes: the decorator is triton.autotune with the same arguments.
"""

from __future__ import annotations

import triton
from triton.runtime import Autotuner

from ._device import INTERPRET


class FirstKeptConfig(Autotuner):
    """An Autotuner that launches the first config `early_config_prune` keeps, timing nothing.

    run() follows triton's Autotuner.run (the same in 3.2 through 3.9: named arguments from
    `arg_names`, `early_config_prune(configs, named_args, **kwargs)`, the config's pre_hook, then
    `fn.run(*args, **kwargs, **config.all_kwargs())`), less the cache and the benchmark."""

    def run(self, *args, **kwargs):
        named_args = dict(zip(self.arg_names, args))
        configs = self.configs
        if self.early_config_prune is not None:
            configs = self.early_config_prune(self.configs, named_args, **kwargs)
            if not configs:
                raise RuntimeError(f"{self.base_fn.__name__}: the prune function kept no config")
        config = self.best_config = configs[0]
        if config.pre_hook is not None:
            config.pre_hook({**named_args, **kwargs, **config.all_kwargs()})
        return self.fn.run(*args, **kwargs, **config.all_kwargs())


def autotune(configs, key, **kwargs):
    """triton.autotune(configs=configs, key=key, **kwargs); a FirstKeptConfig in the interpreter."""
    make = triton.autotune(configs=configs, key=key, **kwargs)

    def decorator(fn):
        tuner = make(fn)
        if INTERPRET:
            # Same object, same attributes (configs, keys, fn, ...): only run() differs.
            tuner.__class__ = FirstKeptConfig
        return tuner

    return decorator
