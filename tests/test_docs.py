"""The README's Python examples run, in order and in one namespace, on the tiny stories260K model.

Every ```python block of README.md runs, except one preceded by the line ``<!-- docs-test: skip -->``. The only
substitution: ``pk.load_model()`` (SmolLM2 in the README) loads stories260K, whose tokenizer gets a minimal
chat template (it has none). Everything else is the README's text as written.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
SKIP = "<!-- docs-test: skip -->"
TINY_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant: {% endif %}")


def python_blocks(text: str) -> list[str]:
    """The ```python blocks of a Markdown text, without those marked with :data:`SKIP` just above."""
    blocks = []
    for match in re.finditer(r"^```python[^\n]*\n(.*?)^```", text, flags=re.M | re.S):
        before = text[: match.start()].rstrip().splitlines()
        if before and before[-1].strip() == SKIP:
            continue
        blocks.append(match.group(1))
    return blocks


def test_the_block_extractor():
    text = "a\n```python\nx = 1\n```\n<!-- docs-test: skip -->\n```python\ny = 2\n```\n```bash\nz\n```\n```python title\nw\n```\n"
    assert python_blocks(text) == ["x = 1\n", "w\n"]


@pytest.mark.slow  # ~50 s of CPU: calibrates the four bundled personas (64 texts each) on the tiny model
def test_readme_python_examples_run(shared, tmp_path, monkeypatch, capsys):
    import persona_kernels as pk

    blocks = python_blocks(README.read_text(encoding="utf-8"))
    assert len(blocks) >= 3
    source = "\n".join(blocks)
    assert source.count("pk.load_model()") == 1
    real_load = pk.load_model

    def tiny_model(*args, **kwargs):
        model, tok = real_load(str(shared / "models" / "stories260K"), *args, **kwargs)
        tok.chat_template = TINY_TEMPLATE
        return model, tok

    source = source.replace("pk.load_model()", "_tiny_model()")
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__readme__", "_tiny_model": tiny_model}
    exec(compile(source, str(README), "exec"), namespace)  # noqa: S102 - the README is this repository's own text
    out = capsys.readouterr().out
    # what the README promises to print
    assert "MaskBank(4 personas" in out
    for label in ("base model:", "extravert: ", "introvert: "):
        assert re.search(rf"^{re.escape(label)}", out, flags=re.M), label
    for label in ("extravert:", "base:", "introvert:"):  # the three persona_batch rows
        assert len(re.findall(rf"^{label}", out, flags=re.M)) >= 1, label
    assert "torch.Size([8, 4096])" in out
    # the adapter folder the README writes is complete, and the model is back to the original modules
    assert (tmp_path / "personas" / "persona_config.json").is_file()
    from persona_kernels import patching

    assert not patching.is_patched(namespace["model"])
