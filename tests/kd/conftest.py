import pytest

from moe_understudy.kd.sft import SFTRecipe


@pytest.fixture
def interrupted_sft(monkeypatch):
    """Run an SFT recipe that is interrupted (KeyboardInterrupt) as it reaches step `at`, as a kill would."""

    def run(cfg, out, at: int = 2) -> None:
        original = SFTRecipe._train_step

        def interrupt_at(self, step, examples):
            if step == at:
                raise KeyboardInterrupt
            return original(self, step, examples)

        monkeypatch.setattr(SFTRecipe, "_train_step", interrupt_at)
        try:
            with pytest.raises(KeyboardInterrupt):
                SFTRecipe(cfg, out).setup().train()
        finally:
            monkeypatch.setattr(SFTRecipe, "_train_step", original)

    return run
