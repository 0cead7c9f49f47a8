"""fgm.measures: every complexity measure of Appendix D, registered by family."""

import warnings

# torch.func's jvp (Fisher–Rao) calls torch.jit.script, whose deprecation notice
# torch prints on every run; it is torch's own, about nothing of ours.
warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated",
                        category=FutureWarning)

from .registry import REGISTRY, MeasureSpec, list_measures, measure  # noqa: E402

__all__ = ["REGISTRY", "MeasureSpec", "list_measures", "measure"]
