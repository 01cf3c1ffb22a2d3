"""Teacher sources: vocab padding handled, different tokenizers refused, one forward per signal."""
import pytest
import torch

from distill.errors import UserError
from students.build import build_model
from students.presets import dense
from teachers import LiveTeacher


def tiny_teacher(vocab: int):
    return build_model(dense(vocab_size=vocab, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                             head_dim=16, intermediate_size=64), seed=0)


def test_padded_teacher_vocab_is_cut_to_the_tokenizer():
    teacher = LiveTeacher(tiny_teacher(320), k=400, vocab_size=300, device=torch.device("cpu"))
    assert teacher.k == 300  # k is capped at the real vocab
    ids = torch.randint(0, 300, (2, 8))
    sig, valid = teacher.signal(None, ids)
    assert sig.topk_ids.shape == (2, 8, 300) and int(sig.topk_ids.max()) < 300
    assert valid.all()
    # the cut distribution is renormalised over the real vocab: top-k = everything -> mass 1
    assert torch.allclose(sig.topk_logprobs.exp().sum(-1), torch.ones(2, 8), atol=1e-5)
    assert teacher.forward_calls == 1


def test_smaller_teacher_vocab_means_another_tokenizer():
    with pytest.raises(UserError, match=r"teacher vocab \(290\) is smaller than the tokenizer's \(300\)"):
        LiveTeacher(tiny_teacher(290), k=8, vocab_size=300, device=torch.device("cpu"))


def test_nonfinite_teacher_logits_are_masked():
    teacher = LiveTeacher(tiny_teacher(64), k=8, vocab_size=64, device=torch.device("cpu"))
    real = teacher.logits

    def poisoned(input_ids):
        out = real(input_ids)
        out[0, 3, 5] = float("nan")
        return out

    teacher.logits = poisoned
    sig, valid = teacher.signal(None, torch.randint(0, 64, (2, 6)))
    assert not valid[0, 3] and int((~valid).sum()) == 1
    assert torch.isfinite(sig.topk_logprobs).all()
