import torch

from gape._threads import set_threads


def test_set_threads_skips_the_call_when_the_count_is_unchanged(monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    set_threads(torch.get_num_threads())
    set_threads(None)
    assert calls == []
    set_threads(torch.get_num_threads() + 1)
    assert calls == [torch.get_num_threads() + 1]
    set_threads(0)  # clamped to one thread
    assert calls[-1] == 1

