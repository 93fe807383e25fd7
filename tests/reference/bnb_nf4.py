"""Generates tests/reference/bnb/*.npz: bitsandbytes' NF4 + double quantisation of a few weight matrices.

Run in a separate venv with torch and bitsandbytes (not a dependency of peftjax):
  python -m venv /work/venvs/quant && /work/venvs/quant/bin/pip install torch==2.13.0 bitsandbytes numpy
  OMP_NUM_THREADS=1 /work/venvs/quant/bin/python tests/reference/bnb_nf4.py
Each file holds the weight (PyTorch layout, out x in), the packed codes, the 8-bit absmax codes, the offset,
the second-level fp32 scales, the dynamic 8-bit map bitsandbytes used, and the absmax values and the weight its reference (default-backend) dequantisation gives.  (On this AVX2 CPU,
bitsandbytes 0.50.2's native dequantize_4bit kernel returns other values, max error 0.127 instead of 0.026 on
w_256x160, so it is not used.)  Its 8-bit absmax codes come from a binary search (BinSearch Direct2) that
is not always the nearest code: tests/test_quant.py allows those codes to be one step away where ours is nearer.
"""

import pathlib

import bitsandbytes
import bitsandbytes.functional as F
from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
import numpy as np
import torch

OUT = pathlib.Path(__file__).parent / "bnb"
CASES = {"w_256x160": ((256, 160), torch.float32), "w_40x90": ((40, 90), torch.float32),
         "w_64x96_bf16": ((64, 96), torch.bfloat16)}


def main():
  OUT.mkdir(exist_ok=True)
  gen = torch.Generator().manual_seed(0)
  for name, (shape, dtype) in CASES.items():
    w = (torch.randn(shape, generator=gen) * 0.05).to(dtype)
    w[0, :3] = torch.tensor([0.3, -0.4, 0.0])  # a few outliers and an exact zero
    codes, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    absmax = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
    deq = _dequantize_4bit_compute(codes.reshape(-1), absmax, state.code, 64, w.shape, torch.float32)
    np.savez(OUT / f"{name}.npz", weight=w.float().numpy(), weight_dtype=str(dtype).split(".")[-1],
             codes=codes.numpy().reshape(-1), absmax_codes=state.absmax.numpy(),
             offset=np.float32(state.offset.item()), absmax_scales=state.state2.absmax.numpy(),
             absmax_map=state.state2.code.numpy(), absmax=absmax.numpy(), dequantized=deq.float().numpy(),
             bitsandbytes=bitsandbytes.__version__, torch=torch.__version__)
    print(name, shape, dtype, codes.shape, state.absmax.shape, state.state2.absmax.shape)


if __name__ == "__main__":
  main()
