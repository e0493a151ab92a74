"""Quantization formats, one module each behind one interface (`base.Format`): `fp8`, `nvfp4`, and the
`mixed` declaration built from them. `FORMATS` maps a recipe's format name to its module's `Format`.

This package replaces the single module `omniq/quant/formats.py`; every name that module had is re-exported
here, so `from omniq.quant import formats; formats.nvfp4_quantize(...)` keeps working.
"""

from omniq.quant.formats.base import OTHER_COMPANIONS, PRE_QUANT_SCALE, SCALAR_BYTES, Companion, Format  # noqa: F401
from omniq.quant.formats.fp8 import (E4M3_MAX, FP8, KV_CACHE, FP8Format, FP8Weight, cast_e4m3,  # noqa: F401
                                     fp8_dequantize, fp8_fake_quant, fp8_fake_quant_weight, fp8_quantize, fp8_scale)
from omniq.quant.formats.mixed import (BY_QUANT_ALGO, BY_WEIGHT_DTYPE, COMPANION_SUFFIXES, FORMATS,  # noqa: F401
                                       KV_SUFFIXES, MIXED_PRECISION, SCALE_SUFFIXES, WEIGHT_COMPANIONS,
                                       companion_of, fake_quant_weight, layer_declaration,
                                       quant_algo_of)
from omniq.quant.formats.nvfp4 import (E2M1_MAGNITUDES, E2M1_MAX, E4M3_MIN_SCALE, NVFP4, NVFP4_BLOCK,  # noqa: F401
                                       NVFP4Format, NVFP4Weight, _blocks, _byte_table, _e2m1_table, e2m1_decode,
                                       e2m1_encode, e2m1_encode_pack, e2m1_round, e2m1_unpack_values,
                                       e4m3_all_positive_finite,
                                       nvfp4_block_scales,
                                       nvfp4_dequantize, nvfp4_fake_quant, nvfp4_fake_quant_weight,
                                       nvfp4_global_scale, nvfp4_pack, nvfp4_quantize, pack_e2m1, unpack_e2m1)
from omniq.quant.formats.nvfp4 import _E2M1_STEPS  # noqa: F401
