"""Seeded synthetic LA, ACDC and CRAG datasets in exactly the upstream on-disk formats.

They are small, so a CPU demo trains in seconds, and learnable but not by an intensity threshold:
the target shares its intensity range with distractors of another shape or texture, under a bias
field and noise. The same seed gives byte-identical arrays (and files). Size arguments are
(min, max) ranges, inclusive, drawn per case for every spatial side.
"""

from agcl.data.synth.acdc import synth_acdc
from agcl.data.synth.crag import synth_crag
from agcl.data.synth.la import synth_la

SYNTHESIZERS = {"la": synth_la, "acdc": synth_acdc, "crag": synth_crag}

__all__ = ["SYNTHESIZERS", "synth_acdc", "synth_crag", "synth_la"]
