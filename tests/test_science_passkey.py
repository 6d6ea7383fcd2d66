"""The passkey generator: the key is where it says, beyond the training length when asked, and
the answer is the sequence's end; the accuracy counts exact answers only."""

import numpy as np
import pytest

from btlm_jax.experiments import passkey


def _encode(text):  # an independent, transparent tokenizer: one id per character
    return [ord(c) for c in text]


def _decode(ids):
    return "".join(chr(int(i)) for i in ids)


@pytest.mark.parametrize("length,beyond", [(400, 0), (800, 200), (1600, 400)])
def test_the_key_is_where_it_says_and_beyond_the_training_length(length, beyond):
    rng = np.random.default_rng(length)
    for _ in range(20):
        e = passkey.example_ids(_encode, rng, length, beyond=beyond)
        ids = e["ids"]
        assert ids.shape == (length,) and ids.dtype == np.int32
        n0, n1 = e["needle"]
        a0, a1 = e["answer"]
        assert _decode(ids[n0:n1]) == passkey.needle(e["key"])
        assert _decode(ids[a0:a1]) == passkey.answer(e["key"]) and a1 == length
        assert _decode(ids[:a0]).endswith(passkey.QUESTION)
        assert a0 - n1 > beyond
        # the key appears nowhere else before the question
        text = _decode(ids[:a0])
        assert text.count(e["key"]) == 2 and all(w in passkey.DIGITS for w in e["key"].split())


def test_explicit_positions_and_impossible_requests():
    rng = np.random.default_rng(0)
    e = passkey.example_ids(_encode, rng, 500, needle_pos=17)
    assert e["needle"][0] == 17
    with pytest.raises(ValueError, match="needle position"):
        passkey.example_ids(_encode, rng, 200, needle_pos=190)
    with pytest.raises(ValueError, match="no room"):
        passkey.example_ids(_encode, rng, 200, beyond=190)


def test_training_text_holds_one_needle_and_ends_with_the_answer():
    rng = np.random.default_rng(1)
    for n in (300, 600, 1000):
        t = passkey.training_text(rng, n)
        key = t[t.index(" The pass key is ") + 17:].split(".")[0]
        assert t.endswith(passkey.QUESTION + passkey.answer(key))
        assert t.count(passkey.needle(key)) == 1 and abs(len(t) - n) < 40


def test_accuracy_counts_only_fully_correct_answers():
    rng = np.random.default_rng(2)
    ex = [passkey.example_ids(_encode, rng, 300) for _ in range(5)]
    V = 128

    def oracle(ids, scale, wrong=()):
        logits = np.zeros(ids.shape + (V,), np.float32)
        nxt = np.concatenate([ids[:, 1:], ids[:, :1]], 1)
        np.put_along_axis(logits, nxt[..., None], 1.0, -1)
        for b in wrong:  # corrupt one answer token of row b
            a0 = ex[b]["answer"][0]
            logits[b, a0 - 1] = 0
            logits[b, a0 - 1, (ids[b, a0] + 1) % V] = 1
        return logits

    assert passkey.accuracy(oracle, ex, 1.0, batch=2) == 1.0
    assert passkey.accuracy(lambda i, s: oracle(i, s, wrong=(0, 1)), ex, 1.0, batch=5) == 0.6


def test_examples_are_tokenized_as_training_documents_are():
    """With a SentencePiece model (a leading space is a piece of its own there), an evaluation
    example is exactly the tokenizer's tokenization of its own text, so the answer tokens are the
    ones a training document ends with. Encoding the answer alone gave ' ', 'e', 'ight' where the
    documents have ' e', 'ight': 0% passkey accuracy for a model that had learned the task."""
    from btlm_jax.data.tokenizer import Tokenizer, train_sentencepiece

    rng = np.random.default_rng(3)
    docs = [passkey.training_text(rng, 300) for _ in range(200)]
    tok = Tokenizer("sentencepiece", train_sentencepiece(docs, 300))
    for length, beyond in ((256, 0), (512, 200)):
        for _ in range(10):
            e = passkey.example_ids(tok.encode, rng, length, beyond=beyond)
            ids = [int(i) for i in e["ids"]]
            a0, a1 = e["answer"]
            text = tok.decode(ids)
            assert tok.decode(ids[a0:a1]).strip() == passkey.answer(e["key"]).strip()
            # tokenizing the example's text in one piece (from the needle on, after a sentence,
            # as in a document) gives its tokens: the pieces were tokenized consistently
            n0 = e["needle"][0]
            tail = " " + tok.decode(ids[n0:]).lstrip()
            ctx = tok.encode("Here we go.")
            whole = tok.encode("Here we go." + tail)
            assert whole[:len(ctx)] == ctx and whole[len(ctx):] == ids[n0:]
            # the answer tokens are those that end a training document with this key
            doc = tok.encode(passkey.QUESTION.strip() + passkey.answer(e["key"]))
            assert doc[-(a1 - a0):] == ids[a0:a1]
            assert text.endswith(passkey.QUESTION + passkey.answer(e["key"]))
