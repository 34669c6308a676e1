"""The routing analysis (``moeshard routing``) against transformers' router logits on the same token ids.

The oracle is computed here, independently: the token ids from the tokenizer files (sentencepiece, or the
``tokenizers`` package), transformers' ``output_router_logits=True`` per MoE layer, the top-k of their
softmax, and plain Python counts over those lists. Every number of routing.json, of both figures and the
token page's first choices is compared with it.
"""

from __future__ import annotations

import html.parser
import itertools
import json
import math
from pathlib import Path

import pytest
import sentencepiece
import tokenizers
import torch
import transformers
from tokenizers import decoders, models, pre_tokenizers, trainers

from moeshard.cluster.analysis.figures import expert_share_figure, repetition_figure
from moeshard.cluster.analysis.routing_stats import random_baseline
from moeshard.cluster.analysis.run import analyze_routing, read_domains
from moeshard.cluster.cli.main import main

PROSE = (
    "The history of the city begins with a small market on the river. Merchants came from the north and the south, "
    "and over the centuries the market grew into a town with walls, churches and a university. "
    "Today the old bridge is a <quiet> place where tourists & students meet \"every\" evening."
)
CODE = "def total(xs):\n    s = 0\n    for x in xs:\n        s += x * x\n    return s\n"
CONTEXT = 64  # the Mixtral checkpoint's max_position_embeddings: PROSE needs more than one window


# -- the oracle ---------------------------------------------------------------------------------------------


def hf_routing(reference, token_ids: list[int]) -> dict[int, list[list[int]]]:
    """{MoE layer: top-k expert ids per token, first choice first} from transformers' router logits."""
    moe_layers = [i for i, layer in enumerate(reference.model.layers) if hasattr(layer.mlp, "gate")]
    with torch.no_grad():
        out = reference(torch.tensor([token_ids]), output_router_logits=True)
    k = reference.config.num_experts_per_tok
    assert len(out.router_logits) == len(moe_layers)
    return {
        layer: torch.topk(torch.softmax(logits.float(), dim=-1), k, dim=-1).indices.tolist()  # [T, E] -> [T, K]
        for layer, logits in zip(moe_layers, out.router_logits)
    }


def expected_domain(reference, token_ids: list[int], window: int) -> dict:
    """The domain's numbers from transformers, each window of ``window`` tokens its own forward."""
    config = reference.config
    num_experts, k = getattr(config, "num_local_experts", None) or config.num_experts, config.num_experts_per_tok
    windows = [token_ids[s : s + window] for s in range(0, len(token_ids), window)]
    routed = [hf_routing(reference, w) for w in windows]
    layers, top1 = [], {}
    for layer in routed[0]:
        per_window = [r[layer] for r in routed]  # [windows][W][K]
        choices = [e for ids in per_window for row in ids for e in row]
        assert len(choices) == len(token_ids) * k
        pairs = [(a, b) for ids in per_window for a, b in zip(ids, ids[1:])]
        layers.append({
            "layer": layer,
            "expert_share": [choices.count(e) / len(choices) for e in range(num_experts)],
            "same_top1": sum(a[0] == b[0] for a, b in pairs) / len(pairs),
            "shared_any": sum(bool(set(a) & set(b)) for a, b in pairs) / len(pairs),
        })  # fmt: skip
        top1[layer] = [row[0] for ids in per_window for row in ids]
    return {"tokens": len(token_ids), "windows": len(windows), "layers": layers, "top1": top1}


def assert_domain_matches(ours: dict, theirs: dict) -> None:
    assert ours["tokens"] == theirs["tokens"] and ours["windows"] == theirs["windows"]
    assert [entry["layer"] for entry in ours["layers"]] == [entry["layer"] for entry in theirs["layers"]]
    for mine, expected in zip(ours["layers"], theirs["layers"]):
        assert mine["expert_share"] == pytest.approx(expected["expert_share"], abs=1e-12)
        assert mine["same_top1"] == pytest.approx(expected["same_top1"], abs=1e-12)
        assert mine["shared_any"] == pytest.approx(expected["shared_any"], abs=1e-12)


# -- checkpoints --------------------------------------------------------------------------------------------


def _write_bpe(path: Path) -> int:
    """A small byte-level BPE tokenizer.json (no BOS, as Qwen's and OLMoE's); returns its vocabulary size."""
    tk = tokenizers.Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=alphabet)
    tk.train_from_iterator([PROSE, CODE] * 3, trainer)
    tk.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": None, "eos_token": "<|endoftext|>"}))
    return tk.get_vocab_size(with_added_tokens=True)


FAMILIES = {
    "qwen2_dense_layer0": ("Qwen2MoeForCausalLM", dict(num_hidden_layers=3, mlp_only_layers=[0])),
    "olmoe_e16_k4": ("OlmoeForCausalLM", dict()),
}


@pytest.fixture(scope="module")
def mixtral_dir(tiny_checkpoint_factory):
    return tiny_checkpoint_factory("routing_mixtral", seed=11, with_tokenizer=True, max_position_embeddings=CONTEXT)


def load_reference(path: Path, architecture: str):
    return getattr(transformers, architecture).from_pretrained(path, dtype=torch.float32, experts_implementation="eager").eval()


@pytest.fixture(scope="module")
def mixtral_analysis(mixtral_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("routing_out")
    inputs = tmp_path_factory.mktemp("routing_in")
    (inputs / "prose.txt").write_text(PROSE)
    (inputs / "code.txt").write_text(CODE)
    domains = read_domains([inputs / "prose.txt", inputs / "code.txt"])
    analysis = analyze_routing(mixtral_dir, domains, out, max_batch_tokens=7)  # prefills chunked 7 tokens at a time
    return analysis, out


@pytest.fixture(scope="module")
def mixtral_expected(mixtral_dir):
    reference = load_reference(mixtral_dir, "MixtralForCausalLM")
    sp = sentencepiece.SentencePieceProcessor(model_file=str(mixtral_dir / "tokenizer.model"))
    ids = {name: [sp.bos_id(), *sp.encode(text)] for name, text in (("prose", PROSE), ("code", CODE))}
    assert len(ids["prose"]) > CONTEXT  # more than one context window
    return {name: expected_domain(reference, token_ids, CONTEXT - 1) for name, token_ids in ids.items()}, ids


# -- tests --------------------------------------------------------------------------------------------------


def test_routing_json_matches_transformers(mixtral_dir, mixtral_analysis, mixtral_expected):
    (_, out), (expected, _) = mixtral_analysis, mixtral_expected
    report = json.loads((out / "routing.json").read_text())
    assert report["model"] == mixtral_dir.name
    assert (report["experts"], report["top_k"]) == (8, 2)
    assert report["random_baseline"] == pytest.approx({"same_top1": 1 / 8, "shared_any": 1 - 15 / 28})
    assert list(report["domains"]) == ["prose", "code"]
    assert expected["prose"]["windows"] == 2
    for name in ("prose", "code"):
        assert_domain_matches(report["domains"][name], expected[name])


def test_figures_plot_the_transformers_numbers(mixtral_analysis, mixtral_expected):
    (analysis, out), (expected, _) = mixtral_analysis, mixtral_expected
    assert (out / "expert_share.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "repetition.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    names = ["prose", "code"]
    shares = expert_share_figure(analysis.report)
    for ax, layer_index in zip(shares.axes, range(2)):
        layer = expected["prose"]["layers"][layer_index]["layer"]
        assert ax.get_title() == f"layer {layer}"
        for container, name in zip(ax.containers, names):
            heights = [bar.get_height() for bar in container]
            assert heights == pytest.approx(expected[name]["layers"][layer_index]["expert_share"], abs=1e-12)
    repetition = repetition_figure(analysis.report)
    for ax, field in zip(repetition.axes, ("same_top1", "shared_any")):
        lines = ax.get_lines()
        for line, name in zip(lines, names):
            assert list(line.get_xdata()) == [entry["layer"] for entry in expected[name]["layers"]]
            assert list(line.get_ydata()) == pytest.approx([entry[field] for entry in expected[name]["layers"]], abs=1e-12)
        baseline = lines[len(names)].get_ydata()[0]
        assert baseline == pytest.approx({"same_top1": 1 / 8, "shared_any": 1 - 15 / 28}[field])


class _Spans(html.parser.HTMLParser):
    """Every token span's text and title, per <h3> section."""

    def __init__(self):
        super().__init__()
        self.sections: list[tuple[str, list[list[str]]]] = []  # (heading, [[title, text], ...])
        self._in_span = self._in_h = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag in ("h2", "h3"):
            self._in_h = tag
        elif tag == "span" and "title" in attrs and attrs["title"].startswith("token "):
            self.sections[-1][1].append([attrs["title"], ""])
            self._in_span = True

    def handle_endtag(self, tag):
        self._in_span = False if tag == "span" else self._in_span
        self._in_h = False if tag in ("h2", "h3") else self._in_h

    def handle_data(self, data):
        if self._in_h == "h2":
            self.domain = data
        elif self._in_h == "h3":
            self.sections.append((f"{self.domain.split(' ')[0]} {data}", []))
        elif self._in_span:
            self.sections[-1][1][-1][1] += data


def test_token_page_colours_by_the_transformers_first_choice(mixtral_analysis, mixtral_expected):
    (_, out), (expected, ids) = mixtral_analysis, mixtral_expected
    page = (out / "tokens.html").read_text()
    assert "<quiet" not in page and "quiet>" not in page and all(e in page for e in ("&lt;", "&gt;", "&amp;", "&quot;"))
    parser = _Spans()
    parser.feed(page)
    headings = [heading for heading, _ in parser.sections]
    assert headings == ["prose layer 0", "prose layer 1", "code layer 0", "code layer 1"]
    for heading, spans in parser.sections:
        name, layer = heading.split(" ")[0], int(heading.split(" ")[-1])
        titles = [title for title, _ in spans]
        top1 = [int(t.split("experts [")[1].split(",")[0]) for t in titles]
        assert [int(t.split()[1].rstrip(":")) for t in titles] == ids[name]
        assert top1 == expected[name]["top1"][layer]
        text = "".join(piece for _, piece in spans[1:])  # after BOS, the pieces spell the text
        assert text == {"prose": PROSE, "code": CODE}[name]


@pytest.mark.parametrize("variant", sorted(FAMILIES))
def test_fine_grained_families_match_transformers(variant, tiny_family_factory, tmp_path):
    architecture, overrides = FAMILIES[variant]
    tokenizer_dir = tmp_path / "tok"
    tokenizer_dir.mkdir()
    vocab = _write_bpe(tokenizer_dir)
    path = tiny_family_factory(f"routing_{variant}", architecture, seed=4, vocab_size=vocab, **overrides)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (path / name).write_text((tokenizer_dir / name).read_text())
    analysis = analyze_routing(path, {"prose": PROSE, "code": CODE}, tmp_path / "out")
    reference = load_reference(path, architecture)
    bpe = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
    report = json.loads((tmp_path / "out" / "routing.json").read_text())
    k, num_experts = reference.config.num_experts_per_tok, reference.config.num_experts
    assert (report["experts"], report["top_k"]) == (num_experts, k)
    for name, text in (("prose", PROSE), ("code", CODE)):
        token_ids = bpe.encode(text).ids
        assert_domain_matches(report["domains"][name], expected_domain(reference, token_ids, len(token_ids)))
    if "mlp_only_layers" in overrides:  # the dense layer has no router and no entry
        assert [e.layer for e in analysis.report.domains["prose"].layers] == [1, 2]


@pytest.mark.parametrize("num_experts, k", [(8, 2), (6, 3), (5, 3), (7, 1), (4, 4)])
def test_random_baseline_equals_enumeration(num_experts, k):
    """Two independent uniformly random k-sets: the chance they intersect, by enumerating every pair of sets."""
    sets = [set(c) for c in itertools.combinations(range(num_experts), k)]
    intersecting = sum(bool(a & b) for a in sets for b in sets) / len(sets) ** 2
    baseline = random_baseline(num_experts, k)
    assert baseline.shared_any == pytest.approx(intersecting)
    assert baseline.same_top1 == pytest.approx(1 / num_experts)
    assert math.isclose(random_baseline(8, 2).shared_any, 0.4642857, rel_tol=1e-6)  # the Mixtral paper's 46%


def test_cli_writes_the_same_report(mixtral_dir, mixtral_analysis, tmp_path, capsys):
    _, out = mixtral_analysis
    (tmp_path / "prose.txt").write_text(PROSE)
    (tmp_path / "code.txt").write_text(CODE)
    args = ["routing", str(mixtral_dir), "--input", str(tmp_path / "prose.txt"), "--input", str(tmp_path / "code.txt")]
    assert main([*args, "--out", str(tmp_path / "cli")]) == 0
    printed = capsys.readouterr().out
    assert "| prose |" in printed and "| random | - | 12.5% | 46.4% |" in printed
    assert json.loads((tmp_path / "cli" / "routing.json").read_text()) == json.loads((out / "routing.json").read_text())


def test_cli_bad_input_is_one_line(mixtral_dir, tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "ok.txt").write_text("hello")
    (tmp_path / "not_a_model").mkdir()
    cases = [
        ([str(mixtral_dir), "--input", str(tmp_path / "missing.txt")], "does not exist"),
        ([str(mixtral_dir), "--input", str(tmp_path / "empty.txt")], "has no text"),
        ([str(tmp_path / "nowhere"), "--input", str(tmp_path / "ok.txt")], "model directory"),
        ([str(tmp_path / "not_a_model"), "--input", str(tmp_path / "ok.txt")], "no config.json"),
        ([str(mixtral_dir), "--input", str(tmp_path / "ok.txt"), "--input", str(tmp_path / "ok.txt")], "named 'ok'"),
    ]
    for args, message in cases:
        assert main(["routing", *args, "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("moeshard: error: ") and message in err[0], err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_expert_actors_give_the_same_report(mixtral_dir, mixtral_analysis, tmp_path):
    """The routing is computed on the coordinator: two expert actors on Ray give the in-process numbers."""
    analysis, _ = mixtral_analysis
    domains = {"prose": PROSE, "code": CODE}
    clustered = analyze_routing(mixtral_dir, domains, tmp_path / "cluster", expert_actors=2, max_batch_tokens=7)
    assert clustered.report == analysis.report
