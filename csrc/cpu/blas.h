// Small dense products of the CPU kernels: the BLAS that torch's CPU library links (sgemm_/dgemm_,
// Fortran interface, 32-bit sizes), or a plain loop when this torch build does not export them
// (weak symbols: the extension still loads, only slower).
#pragma once

#include <cstdint>

extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
}

namespace mmr {

template <typename scalar_t>
void fortran_gemm(const char* ta, const char* tb, const int* m, const int* n, const int* k, const scalar_t* alpha,
                  const scalar_t* a, const int* lda, const scalar_t* b, const int* ldb, const scalar_t* beta,
                  scalar_t* c, const int* ldc);

template <>
inline void fortran_gemm<float>(const char* ta, const char* tb, const int* m, const int* n, const int* k,
                                const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                                const float* beta, float* c, const int* ldc) {
  sgemm_(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

template <>
inline void fortran_gemm<double>(const char* ta, const char* tb, const int* m, const int* n, const int* k,
                                 const double* alpha, const double* a, const int* lda, const double* b,
                                 const int* ldb, const double* beta, double* c, const int* ldc) {
  dgemm_(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

template <typename scalar_t>
bool has_blas() {
  return sizeof(scalar_t) == sizeof(float) ? sgemm_ != nullptr : dgemm_ != nullptr;
}

// Row-major C[m, n] = op(A) op(B), op(A) [m, k] and op(B) [k, n]; ta / tb: A is stored as [k, m]
// (row stride lda) / B as [n, k] (row stride ldb). C has row stride ldc and is overwritten.
template <typename scalar_t>
void matmul(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const scalar_t* A, int64_t lda, const scalar_t* B,
            int64_t ldb, scalar_t* C, int64_t ldc) {
  if (has_blas<scalar_t>()) {
    // column-major view: C^T [n, m] = op(B)^T op(A)^T
    const char tra = tb ? 'T' : 'N', trb = ta ? 'T' : 'N';
    const int M = static_cast<int>(n), N = static_cast<int>(m), Kd = static_cast<int>(k);
    const int LDA = static_cast<int>(ldb), LDB = static_cast<int>(lda), LDC = static_cast<int>(ldc);
    const scalar_t one = 1, zero = 0;
    fortran_gemm<scalar_t>(&tra, &trb, &M, &N, &Kd, &one, B, &LDA, A, &LDB, &zero, C, &LDC);
    return;
  }
  for (int64_t i = 0; i < m; ++i) {
    scalar_t* c = C + i * ldc;
    for (int64_t j = 0; j < n; ++j) c[j] = scalar_t(0);
    for (int64_t p = 0; p < k; ++p) {
      const scalar_t a = ta ? A[p * lda + i] : A[i * lda + p];
      if (tb) {
        for (int64_t j = 0; j < n; ++j) c[j] += a * B[j * ldb + p];
      } else {
        const scalar_t* b = B + p * ldb;
        for (int64_t j = 0; j < n; ++j) c[j] += a * b[j];
      }
    }
  }
}

}  // namespace mmr
