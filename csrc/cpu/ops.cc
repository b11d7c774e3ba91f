// Chooses the per-ISA operator table (csrc/cpu/isa/ops.cc) for the active ISA.
#include <stdexcept>

#include "cpu/ops.h"

namespace pyllm {

namespace scalar { const OpsTable& ops_table(); }
#ifdef PYLLM_HAVE_ISA_AVX2
namespace avx2 { const OpsTable& ops_table(); }
#endif
#ifdef PYLLM_HAVE_ISA_AVX512
namespace avx512 { const OpsTable& ops_table(); }
#endif
#ifdef PYLLM_HAVE_ISA_NEON
namespace neon { const OpsTable& ops_table(); }
#endif

const OpsTable& ops_for(Isa isa) {
  if (!isa_available(isa)) throw std::runtime_error(std::string("ISA not available: ") + isa_name(isa));
  switch (isa) {
#ifdef PYLLM_HAVE_ISA_AVX2
    case Isa::Avx2:
      return avx2::ops_table();
#endif
#ifdef PYLLM_HAVE_ISA_AVX512
    case Isa::Avx512:
      return avx512::ops_table();
#endif
#ifdef PYLLM_HAVE_ISA_NEON
    case Isa::Neon:
      return neon::ops_table();
#endif
    default:
      return scalar::ops_table();
  }
}

const OpsTable& ops() { return ops_for(active_isa()); }

}  // namespace pyllm
