"""The README's worked example of a new method stays true: it registers, trains and is strict."""

import re
from pathlib import Path

import torch

from agcl.data.specs import SPECS
from agcl.methods import registry
from agcl.methods.base import Batch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_method_example_registers_and_trains():
    code = re.search(r"`baselines/entropy_min.py`:\n\n```python\n(.*?)```", README.read_text(),
                     re.DOTALL).group(1)
    # registered under a name of its own: a user who saved the example as
    # baselines/entropy_min.py (as the README says) has "entropy_min" registered already
    assert '@register_method("entropy_min")' in code
    code = code.replace('@register_method("entropy_min")', '@register_method("readme_example")')
    namespace = {"__name__": "baselines.readme_example"}
    try:
        exec(compile(code, "README example", "exec"), namespace)  # noqa: S102
        cls = registry.get_method("readme_example")
        hparams = cls.hparams_for("la", {"weight": 0.2})
        torch.manual_seed(0)
        method = cls(SPECS["la"], hparams, {"n_filters": 2}, 10)
        batch = Batch(torch.randn(2, 1, 16, 16, 16), torch.randint(0, 2, (2, 16, 16, 16)),
                      torch.randn(2, 1, 16, 16, 16))
        loss, logs = method.train_step(batch, 0)
        loss.backward()
        assert torch.isfinite(loss) and set(logs) == {"loss_sup", "entropy"}
        assert logs["entropy"] > 0
    finally:
        registry._METHODS.pop("readme_example", None)
