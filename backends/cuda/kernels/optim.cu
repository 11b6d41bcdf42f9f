// Fused optimizer updates, one kernel per rule, element-wise over a parameter of n elements.
// They follow runtime/optim.py (torch.optim's single-tensor code) operation by operation: every
// product, sum, quotient and square root is IEEE float32 with round-to-nearest (__fmul_rn,
// __fadd_rn, __fsub_rn, __fdiv_rn, __fsqrt_rn: never contracted into FMAs nor approximated under
// --use_fast_math), and the host passes each scalar as NumPy casts the Python float it multiplies
// by (float32 of the double), so the results equal NumPy's bit for bit (FTRL's powers within an ulp).
//
// Common arguments: p (parameter, updated in place), g (gradient), n, wd (L2 weight decay, folded into
// the gradient first: g ← g + wd·p; 0 for none and for AdamW), neg_lr = −η.
// State arrays are updated in place; an unused state pointer may be any valid pointer.
//
//   sgd_step(p, g, buf, n, wd, neg_lr, mom, nesterov, first)
//       mom ≠ 0: buf ← g (first step) or buf·mom + g; g ← g + mom·buf (nesterov) or buf; p ← p + (−η)·g
//   adagrad_step(p, g, sum, n, wd, neg_lr, eps)        sum ← sum + g·g; p ← p + (−η)·(g/(√sum + eps))
//   rmsprop_step(p, g, sq, buf, n, wd, neg_lr, alpha, one_m_alpha, eps, mom)
//       sq ← sq·α + ((1−α)·g)·g; a = √sq + eps; mom > 0: buf ← buf·mom + g/a, p ← p + (−η)·buf;
//       else p ← p + (−η)·(g/a)
//   adadelta_step(p, g, sq, acc, n, wd, neg_lr, rho, one_m_rho, eps)
//       sq ← sq·ρ + ((1−ρ)·g)·g; δ = (√(acc + eps)/√(sq + eps))·g; acc ← acc·ρ + ((1−ρ)·δ)·δ; p ← p + (−η)·δ
//   adam_step(p, g, m, v, n, wd, decay, w1, beta2, one_m_beta2, bc2_sqrt, eps, neg_step)
//       p ← p·decay (AdamW; decay = 1 − η·λ, skipped when 1); m ← lerp(m, g, w1), w1 = 1 − β1 (torch's
//       two-sided lerp); v ← v·β2 + ((1−β2)·g)·g; p ← p + (−η/(1−β1ᵗ))·(m/(√v/bc2_sqrt + eps))
//   rprop_step(p, g, prev, step, n, wd, etaminus, etaplus, step_min, step_max)
//       s = g·prev; step ← clamp(step·(s > 0 ? η⁺ : s < 0 ? η⁻ : 1), min, max); g ← 0 where s < 0;
//       p ← p − sign(g)·step; prev ← g  (the step array starts at η, the host fills it)
//   ftrl_step(p, g, acc, lin, n, wd, lr, neg_p, l1, two_l2)
//       n' = acc + g·g; σ = (n'^−p − acc^−p)/η; lin ← lin + (g − σ·p); acc ← n';
//       p ← |lin| > l1 ? (sign(lin)·l1 − lin)/(n'^−p/η + 2·l2) : 0

#define CNNC_LOOP(i, n) \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (long long)gridDim.x * blockDim.x)

__device__ __forceinline__ float decayed(float g, float p, float wd) {
    return wd != 0.0f ? __fadd_rn(g, __fmul_rn(wd, p)) : g;
}

// x^y rounded to float32 (computed in double: --use_fast_math approximates powf)
__device__ __forceinline__ float pow_rn(float x, float y) { return (float)pow((double)x, (double)y); }

extern "C" __global__ void __launch_bounds__(256) KERNEL(sgd_step)(float* __restrict__ p, const float* __restrict__ grad,
                                                                 float* __restrict__ buf, long long n, float wd,
                                                                 float neg_lr, float mom, int nesterov, int first) {
    CNNC_LOOP(i, n) {
        const float w = p[i];
        float g = decayed(grad[i], w, wd);
        if (mom != 0.0f) {
            const float b = first ? g : __fadd_rn(__fmul_rn(buf[i], mom), g);
            buf[i] = b;
            g = nesterov ? __fadd_rn(g, __fmul_rn(mom, b)) : b;
        }
        p[i] = __fadd_rn(w, __fmul_rn(neg_lr, g));
    }
}

extern "C" __global__ void __launch_bounds__(256) KERNEL(adagrad_step)(float* __restrict__ p,
                                                                     const float* __restrict__ grad,
                                                                     float* __restrict__ sum, long long n, float wd,
                                                                     float neg_lr, float eps) {
    CNNC_LOOP(i, n) {
        const float w = p[i];
        const float g = decayed(grad[i], w, wd);
        const float s = __fadd_rn(sum[i], __fmul_rn(g, g));
        sum[i] = s;
        const float std = __fadd_rn(__fsqrt_rn(s), eps);
        p[i] = __fadd_rn(w, __fmul_rn(neg_lr, __fdiv_rn(g, std)));
    }
}

extern "C" __global__ void __launch_bounds__(256) KERNEL(rmsprop_step)(float* __restrict__ p,
                                                                     const float* __restrict__ grad,
                                                                     float* __restrict__ sq, float* __restrict__ buf,
                                                                     long long n, float wd, float neg_lr, float alpha,
                                                                     float one_m_alpha, float eps, float mom) {
    CNNC_LOOP(i, n) {
        const float w = p[i];
        const float g = decayed(grad[i], w, wd);
        const float v = __fadd_rn(__fmul_rn(sq[i], alpha), __fmul_rn(__fmul_rn(one_m_alpha, g), g));
        sq[i] = v;
        const float avg = __fadd_rn(__fsqrt_rn(v), eps);
        if (mom > 0.0f) {
            const float b = __fadd_rn(__fmul_rn(buf[i], mom), __fdiv_rn(g, avg));
            buf[i] = b;
            p[i] = __fadd_rn(w, __fmul_rn(neg_lr, b));
        } else {
            p[i] = __fadd_rn(w, __fmul_rn(neg_lr, __fdiv_rn(g, avg)));
        }
    }
}

extern "C" __global__ void __launch_bounds__(256) KERNEL(adadelta_step)(float* __restrict__ p,
                                                                      const float* __restrict__ grad,
                                                                      float* __restrict__ sq, float* __restrict__ acc,
                                                                      long long n, float wd, float neg_lr, float rho,
                                                                      float one_m_rho, float eps) {
    CNNC_LOOP(i, n) {
        const float w = p[i];
        const float g = decayed(grad[i], w, wd);
        const float v = __fadd_rn(__fmul_rn(sq[i], rho), __fmul_rn(__fmul_rn(one_m_rho, g), g));
        sq[i] = v;
        const float std = __fsqrt_rn(__fadd_rn(v, eps));
        float delta = __fsqrt_rn(__fadd_rn(acc[i], eps));
        delta = __fdiv_rn(delta, std);
        delta = __fmul_rn(delta, g);
        acc[i] = __fadd_rn(__fmul_rn(acc[i], rho), __fmul_rn(__fmul_rn(one_m_rho, delta), delta));
        p[i] = __fadd_rn(w, __fmul_rn(neg_lr, delta));
    }
}

extern "C" __global__ void __launch_bounds__(256) KERNEL(adam_step)(float* __restrict__ p, const float* __restrict__ grad,
                                                                  float* __restrict__ m, float* __restrict__ v,
                                                                  long long n, float wd, float decay, float w1,
                                                                  float beta2, float one_m_beta2, float bc2_sqrt,
                                                                  float eps, float neg_step) {
    CNNC_LOOP(i, n) {
        float w = p[i];
        if (decay != 1.0f) w = __fmul_rn(w, decay);  // AdamW's decoupled decay, before everything else
        const float g = decayed(grad[i], w, wd);
        float mi = m[i];
        if (w1 < 0.5f) {
            mi = __fadd_rn(mi, __fmul_rn(w1, __fsub_rn(g, mi)));
        } else {
            mi = __fsub_rn(g, __fmul_rn(__fsub_rn(g, mi), __fsub_rn(1.0f, w1)));
        }
        m[i] = mi;
        const float vi = __fadd_rn(__fmul_rn(v[i], beta2), __fmul_rn(__fmul_rn(one_m_beta2, g), g));
        v[i] = vi;
        const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(vi), bc2_sqrt), eps);
        p[i] = __fadd_rn(w, __fmul_rn(neg_step, __fdiv_rn(mi, denom)));
    }
}

extern "C" __global__ void __launch_bounds__(256) KERNEL(rprop_step)(float* __restrict__ p,
                                                                   const float* __restrict__ grad,
                                                                   float* __restrict__ prev, float* __restrict__ step,
                                                                   long long n, float wd, float etaminus,
                                                                   float etaplus, float step_min, float step_max) {
    CNNC_LOOP(i, n) {
        const float w = p[i];
        float g = decayed(grad[i], w, wd);
        const float s = __fmul_rn(g, prev[i]);  // a product that underflows to 0 counts as no sign change
        const float factor = s > 0.0f ? etaplus : (s < 0.0f ? etaminus : 1.0f);
        const float d = fminf(fmaxf(__fmul_rn(step[i], factor), step_min), step_max);
        step[i] = d;
        if (s < 0.0f) g = 0.0f;
        const float sign = g > 0.0f ? 1.0f : (g < 0.0f ? -1.0f : 0.0f);
        p[i] = __fsub_rn(w, __fmul_rn(sign, d));
        prev[i] = g;
    }
}

extern "C" __global__ void __launch_bounds__(256) KERNEL(ftrl_step)(float* __restrict__ p, const float* __restrict__ grad,
                                                                  float* __restrict__ acc, float* __restrict__ lin,
                                                                  long long n, float wd, float lr, float neg_p,
                                                                  float l1, float two_l2) {
    CNNC_LOOP(i, n) {
        const float w = p[i];
        const float g = decayed(grad[i], w, wd);
        const float a = acc[i];
        const float a_new = __fadd_rn(a, __fmul_rn(g, g));
        const float a_new_pow = pow_rn(a_new, neg_p);
        const float sigma = __fdiv_rn(__fsub_rn(a_new_pow, pow_rn(a, neg_p)), lr);
        const float z = __fadd_rn(lin[i], __fsub_rn(g, __fmul_rn(sigma, w)));
        lin[i] = z;
        acc[i] = a_new;
        const float quadratic = __fadd_rn(__fdiv_rn(a_new_pow, lr), two_l2);
        const float sign = z > 0.0f ? 1.0f : (z < 0.0f ? -1.0f : 0.0f);
        p[i] = fabsf(z) > l1 ? __fdiv_rn(__fsub_rn(__fmul_rn(sign, l1), z), quadratic) : 0.0f;
    }
}

#undef CNNC_LOOP
