"""`interp sae` and `interp lens` end to end on a tiny Llama with SmolLM2's tokenizer (offline text: fortunes)."""
import json

import pytest

from probes.dictionaries import DictConfig, Dictionary, save
from probes.dictionaries.corpus import FORTUNES, CorpusError, fortunes
from recipes.cli import main


def test_sae_info_reads_any_layout(tmp_path, capsys):
    save(Dictionary(DictConfig(d_in=8, d_sae=16, kind="topk", k=2, site="blocks.0.resid_post")), tmp_path / "d")
    assert main(["sae", "info", str(tmp_path / "d")]) == 0
    out = capsys.readouterr().out
    assert '"kind": "topk"' in out and "source: interp" in out
    assert main(["sae", "info", str(tmp_path / "missing")]) == 2  # one-line InterpError, exit code 2


@pytest.mark.skipif(not FORTUNES.exists(), reason="the Debian 'fortunes' package is not installed")
def test_sae_train_recipe(tiny_llama_dir, tmp_path):
    out = tmp_path / "sae"
    rc = main(["sae", "train", "--model", str(tiny_llama_dir), "--site", "blocks.1.resid_post", "--tokens", "600",
               "--steps", "40", "--batch-size", "128", "--eval-windows", "2", "--seq-len", "32", "--k", "4",
               "--out", str(out)])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["train_tokens"] == 600 and m["steps"] == 40
    assert m["error_term_max_abs_logit_diff"] <= 1e-5
    assert abs(m["ce_error_term"] - m["ce_clean"]) < 1e-6
    assert 0 <= m["heldout_dead_fraction"] <= 1 and m["heldout_l0"] <= 4 + 1e-6
    for f in ("density.png", "features.html", "dictionary/dictionary.json", "store/store.json"):
        assert (out / f).exists(), f
    # a second run resumes from the store and the finished checkpoint instead of redoing them
    assert main(["sae", "train", "--model", str(tiny_llama_dir), "--site", "blocks.1.resid_post", "--tokens", "600",
                 "--steps", "40", "--batch-size", "128", "--eval-windows", "2", "--seq-len", "32", "--k", "4",
                 "--out", str(out)]) == 0
    assert json.loads((out / "store" / "store.json").read_text())["rows"] == 600


def test_lens_recipe(tiny_llama_dir, tmp_path):
    out = tmp_path / "lens"
    assert main(["lens", "The cat sat on the", "--model", str(tiny_llama_dir), "--out", str(out)]) == 0
    assert (out / "logit_lens.png").stat().st_size > 5000
    import interp

    res = interp.Result.load(out / "logit_lens")
    assert res.axes == ("layer", "pos") and res.shape[0] == 2


def test_corpus_error_names_the_package(tmp_path):
    with pytest.raises(CorpusError, match="apt-get install fortunes"):
        fortunes(root=tmp_path)


@pytest.mark.skipif(not FORTUNES.exists(), reason="the Debian 'fortunes' package is not installed")
def test_sae_eval_recipe(tiny_llama_dir, tmp_path, capsys):
    save(Dictionary(DictConfig(d_in=32, d_sae=64, kind="topk", k=4, site="blocks.1.resid_post")), tmp_path / "d")
    assert main(["sae", "eval", str(tmp_path / "d"), "--model", str(tiny_llama_dir), "--windows", "2",
                 "--seq-len", "32"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["error_term"] == m["clean"] and m["tokens"] == 2 * 30 and m["rows"] == 2 * 31
    assert m["l0"] <= 4
