"""GPT2Config: presets and validation messages that name the field."""

import pytest

from graphgen.__main__ import main as graphgen_main
from graphgen.config import PRESETS, ConfigError, GPT2Config, param_specs


@pytest.mark.parametrize("name", ["tiny", "small", "gpt2"])
def test_presets_match_issue(name):
    want = {"tiny": (256, 64, 64, 4, 256, 2), "small": (256, 256, 256, 8, 1024, 4),
            "gpt2": (50257, 1024, 768, 12, 3072, 12)}[name]
    c = GPT2Config.preset(name)
    assert (c.vocab, c.context, c.d_model, c.n_heads, c.d_ff, c.n_layers) == want == PRESETS[name]


def test_gpt2_parameter_count():
    # GPT-2 small: 124,439,808 parameters with tied embeddings
    assert sum(int(__import__("math").prod(s)) for _, s in param_specs(GPT2Config.preset("gpt2"))) == 124_439_808


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(d_model=65), "d_model"),
        (dict(n_heads=0), "n_heads"),
        (dict(vocab=-1), "vocab"),
        (dict(context=0), "context"),
        (dict(d_ff=0), "d_ff"),
        (dict(n_layers=0), "n_layers"),
        (dict(init="normal"), "init"),
        (dict(labels="soft"), "labels"),
        (dict(beta1=1.0), "beta1"),
        (dict(beta2=-0.1), "beta2"),
        (dict(eps=0.0), "eps"),
        (dict(weight_decay=-1.0), "weight_decay"),
        (dict(seed=-3), "seed"),
    ],
)
def test_invalid_values_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        GPT2Config.preset("tiny", **kwargs)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        GPT2Config.preset("huge")


def test_cli_rejects_bad_config(capsys, tmp_path):
    assert graphgen_main(["build", "--config", "tiny", "--n-heads", "5", "--out", str(tmp_path / "x")]) == 2
    assert "divisible by n_heads" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_param_order_is_seed_allocation_order():
    names = [n for n, _ in param_specs(GPT2Config.preset("tiny"))]
    assert names[:2] == ["wte", "wpe"] and names[-2:] == ["lnf_g", "lnf_b"]
    assert names[2:18] == [f"h0.{k}" for k in (
        "ln1_g", "ln1_b", "w_q", "b_q", "w_k", "b_k", "w_v", "b_v", "w_o", "b_o",
        "ln2_g", "ln2_b", "fc_w", "fc_b", "pr_w", "pr_b")]
