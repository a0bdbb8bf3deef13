import subprocess
import sys

from tunelab.cli import COMMANDS, main


def test_tokenizer_fixture_roundtrip(tiny_tokenizer):
    text = "Über café 你好 🙂 12 + 30"
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tiny_tokenizer.decode(ids) == text
    assert tiny_tokenizer.eos_token == "<|im_end|>"
    rendered = tiny_tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_cli_lists_every_verb(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    for verb in COMMANDS:
        assert verb in out


def test_python_dash_m_version():
    out = subprocess.run(
        [sys.executable, "-m", "tunelab", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.startswith("tunelab ")


def test_tiny_hf_families_build(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from tests.helpers.tiny_models import FAMILIES, save_tiny_hf_model

    for family in FAMILIES:
        d = save_tiny_hf_model(tmp_path / family, family)
        m = AutoModelForCausalLM.from_pretrained(str(d)).eval()
        with torch.no_grad():
            out = m(torch.tensor([[1, 2, 3]]), use_cache=False).logits
        assert out.shape == (1, 3, 512)


def test_verb_found_after_top_level_option_value():
    from tunelab.cli import _find_verb

    assert _find_verb(["--log-level", "WARNING", "eval", "--task", "mmlu"]) == "eval"
    assert _find_verb(["--log-level=DEBUG", "demo"]) == "demo"
    assert _find_verb(["--version"]) is None
