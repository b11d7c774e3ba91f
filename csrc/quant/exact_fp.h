// Included first by every reference (de)quantizer file (csrc/quant/*.cc): turns off FMA
// contraction for that file. Bit-exactness with the references (the gguf package, llama.cpp's
// quantizers) needs every a * b + c rounded twice, and GCC contracts across statements by
// default (even with -std=c++17) whenever the target has FMA, e.g. aarch64 or -march=native.
#pragma once

#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif
