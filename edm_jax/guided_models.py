"""Guided models for the sampler driver: a loaded model's bound denoiser wrapped in guidance.

Both wrappers keep the weights a jit argument (`BoundDenoiser`), so the sharded sample function
receives them replicated instead of baking them into the program. The guidance math itself lives in
edm_jax.guidance and, per family, in the process's `guide` (edm_jax.diffusion.process).
"""

from __future__ import annotations

from edm_jax.diffusion import guidance
from edm_jax.diffusion.process import SigmaProcess
from edm_jax.generate import BoundDenoiser
from edm_jax.diffusion.precond import EDMPrecond

__all__ = ["with_classifier_free_guidance", "with_classifier_guidance"]


def with_classifier_free_guidance(model, w):
    """The model's denoiser wrapped in classifier-free guidance, its parameters still a jit argument."""
    if model.label_dim == 0:
        raise ValueError("--guidance needs a class-conditional model; this one has no class labels")
    # Reference pickles record only the kwargs that were passed: a missing label_dropout is its default, 0.
    if not (model.config.get("network") or {}).get("label_dropout", 0):
        raise ValueError("--guidance needs a model trained with label_dropout > 0 (its unconditional mode); "
                         "this one was trained with label_dropout=0")
    inner = model.denoise.apply

    def guided(params, x, sigma, class_labels):
        return guidance.classifier_free(lambda x, s, y: inner(params, x, s, y), w, model.label_dim)(x, sigma, class_labels)

    return BoundDenoiser(guided, model.denoise.params)


def with_classifier_guidance(denoise, label_dim, classifier_dir, scale, *, process=None):
    """A denoiser guided by the classifier in `classifier_dir`; model and classifier weights stay jit arguments.

    The guidance enters as the model's process says (`process.guide`; None = the σ family's D + s·σ²·∇log p).
    """
    from edm_jax import classifier_train

    module, variables, precond = classifier_train.load_classifier(classifier_dir)
    if label_dim != module.num_classes:
        raise ValueError(f"--classifier has {module.num_classes} classes but the model samples {label_dim}; "
                         "classifier guidance needs a class-conditional model over the same classes")
    process = SigmaProcess(precond=EDMPrecond()) if process is None else process
    inner = denoise.apply

    def guided(params, x, sigma, class_labels):
        model_params, classifier_params = params
        log_prob = guidance.classifier_log_prob(module.apply, classifier_params, precond)
        return process.guide(lambda x, s, y: inner(model_params, x, s, y), log_prob, scale)(
            x, sigma, class_labels)

    return BoundDenoiser(guided, (denoise.params, variables))
