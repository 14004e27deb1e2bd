"""Bad arguments raise ValueError naming the argument, before anything runs."""

from __future__ import annotations

import pytest
import torch

from lorafleet.kernels import add_lora, add_lora_slices, sgmv_expand


def good():
    T, h_in, h_out, n, r = 6, 8, 10, 3, 4
    return dict(
        y=torch.zeros(T, h_out),
        x=torch.randn(T, h_in),
        lora_a=torch.randn(n, r, h_in),
        lora_b=torch.randn(n, h_out, r),
        seg_indptr=torch.tensor([0, 2, 6], dtype=torch.int32),
        seg_slots=torch.tensor([0, 2], dtype=torch.int32),
    )


def call(**override):
    args = good()
    kwargs = {k: override.pop(k) for k in ("ranks", "scales", "backend") if k in override}
    args.update(override)
    add_lora(
        args["y"], args["x"], args["lora_a"], args["lora_b"], args["seg_indptr"], args["seg_slots"], **kwargs
    )


def test_good_arguments_pass():
    call()


@pytest.mark.parametrize(
    "override,match",
    [
        (dict(x=torch.randn(6, 8, dtype=torch.float64)), "x: dtype"),
        (dict(y=torch.zeros(6, 10, dtype=torch.float16)), "x: dtype .* differs from y"),
        (dict(x=torch.randn(5, 8)), "x: has 5 rows"),
        (dict(x=torch.randn(8, 6).T), "x: the last dimension must be contiguous"),
        (dict(lora_a=torch.randn(3, 4, 9)), "lora_a: h_in 9"),
        (dict(lora_a=torch.randn(3, 8, 4).transpose(1, 2)), "lora_a: must be contiguous"),
        (dict(lora_a=torch.randn(3, 4, 8).half()), "lora_a: dtype"),
        (dict(lora_b=torch.randn(3, 11, 4)), "lora_b: output widths"),
        (dict(lora_b=torch.randn(2, 10, 4)), "lora_b: slice 0 shape"),
        (dict(lora_b=torch.randn(3, 10)), "lora_b: expected 3-D"),
        (dict(seg_indptr=torch.tensor([0, 2, 6], dtype=torch.int64)), "seg_indptr: expected a 1-D int32"),
        (dict(seg_indptr=torch.tensor([0, 6], dtype=torch.int32)), "seg_indptr: length 2 must be"),
        (dict(seg_indptr=torch.tensor([0, 2, 5], dtype=torch.int32)), "seg_indptr: must start at 0 and end"),
        (
            dict(
                seg_indptr=torch.tensor([0, 4, 2, 6], dtype=torch.int32),
                seg_slots=torch.tensor([0, 1, 2], dtype=torch.int32),
            ),
            "seg_indptr: must be non-decreasing",
        ),
        (dict(seg_slots=torch.tensor([0, 3], dtype=torch.int32)), r"seg_slots: slot 3 outside \[-1, 3\)"),
        (dict(seg_slots=torch.tensor([-2, 0], dtype=torch.int32)), "seg_slots: slot -2"),
        (
            dict(ranks=torch.tensor([4, 5, 1], dtype=torch.int32)),
            r"ranks: every rank must be in \[0, r_max=4\]",
        ),
        (dict(ranks=torch.tensor([4, 4], dtype=torch.int32)), "ranks: expected shape"),
        (dict(ranks=torch.tensor([4, 4, 4])), "ranks: dtype"),
        (dict(scales=torch.ones(3, dtype=torch.float64)), "scales: dtype"),
        (dict(backend="cuda"), "backend: 'cuda' is not one of"),
    ],
)
def test_bad_arguments(override, match):
    with pytest.raises(ValueError, match=match):
        call(**override)


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="backend: triton on CPU tensors needs TRITON_INTERPRET=1"):
        call(backend="triton")


def test_slices_count_and_pairing():
    args = good()
    with pytest.raises(ValueError, match="lora_a: expected 1 to 3 slices"):
        add_lora_slices(
            args["y"],
            args["x"],
            [args["lora_a"]] * 4,
            [args["lora_b"]] * 4,
            args["seg_indptr"],
            args["seg_slots"],
        )
    with pytest.raises(ValueError, match="lora_b: 1 slices but lora_a has 2"):
        add_lora_slices(
            args["y"],
            args["x"],
            [args["lora_a"]] * 2,
            [args["lora_b"]],
            args["seg_indptr"],
            args["seg_slots"],
        )


def test_expand_checks_intermediate():
    args = good()
    with pytest.raises(ValueError, match="inter: expected float32"):
        sgmv_expand(
            args["y"],
            torch.zeros(1, 6, 4, dtype=torch.float16),
            args["lora_b"],
            args["seg_indptr"],
            args["seg_slots"],
        )
