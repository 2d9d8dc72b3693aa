"""Run-directory and config schemas: the one reader of how a process is written down.

A config's (or a run directory's `config.json`'s) diffusion process is one flat `process` section,
{'kind': 'edm', 'sigma_data': 0.5, ...}, each hyperparameter written once. Run directories and converted
checkpoints written before that section existed carry `precond` {kind, kwargs} + `loss` {kind, kwargs}
instead; `process_from_config` reads both, so old runs still load and sample.
"""

from __future__ import annotations

from typing import Any, Mapping

from edm_jax.diffusion.process import make_process, sigma_process

__all__ = ["process_from_config", "process_section"]


def _plain(section) -> dict:
    if section is None:
        return {}
    return section.to_dict() if hasattr(section, "to_dict") else dict(section)


def process_from_config(config: Mapping[str, Any]):
    """The process of a config (ConfigDict or the plain dict of a config.json).

    New schema: `process` = {'kind': ..., **hyperparameters}. Old schemas: `precond` = {'kind', 'kwargs'}
    and `loss` = {'kind', 'kwargs'} (training runs), or both flat {'kind', **hyperparameters} with the loss
    possibly None (converted reference snapshots).
    """
    if config.get("process"):
        section = _plain(config["process"])
        kind = section.pop("kind", None)
        if kind is None:
            raise ValueError("the config's process section has no 'kind'; e.g. process.kind='edm'")
        return make_process(kind, **section)
    if config.get("precond"):
        precond, loss = _legacy(config["precond"]), _legacy(config.get("loss"))
        return sigma_process(precond.pop("kind"), loss=loss.pop("kind", None), precond_kwargs=precond,
                             loss_kwargs=loss)
    raise ValueError("the config has no 'process' section (e.g. process.kind='edm'); start from "
                     "configs/quickstart.py or configs/cifar10_edm.py")


def _legacy(section) -> dict:
    """{'kind', 'kwargs': {...}} (training config.json) or {'kind', **kwargs} (converted snapshots) -> flat."""
    section = _plain(section)
    return {**{k: v for k, v in section.items() if k != "kwargs"}, **_plain(section.get("kwargs"))}


def process_section(process) -> dict:
    """The flat `process` config section that rebuilds `process` (`process_from_config` inverts it)."""
    return process.describe()
