//! Truncated power series (Taylor-mode automatic differentiation) in f64.
//!
//! A [`Series`] of length `n + 1` holds the Taylor coefficients
//! `c_k = f⁽ᵏ⁾(t₀) / k!` of a scalar function around an expansion point, so that
//! `f(t₀ + h) ≈ Σ_{k ≤ n} c_k hᵏ`. Arithmetic and the elementary functions below
//! propagate all coefficients at once with the classical recurrences (Griewank &
//! Walther, *Evaluating Derivatives*, ch. 13), so the schedules in
//! [`crate::schedule`] get derivatives of any order without hand-written formulas.

use std::ops::{Add, Div, Mul, Neg, Sub};

/// Taylor coefficients `c_0 … c_n` of a function around an expansion point.
#[derive(Clone, Debug, PartialEq)]
pub struct Series(pub Vec<f64>);

impl Series {
    /// The constant `v`, truncated at order `n`.
    pub fn constant(v: f64, n: usize) -> Self {
        let mut c = vec![0.0; n + 1];
        c[0] = v;
        Series(c)
    }

    /// The independent variable `t₀ + h` expanded around `t₀`, truncated at order `n`.
    pub fn variable(t0: f64, n: usize) -> Self {
        let mut c = vec![0.0; n + 1];
        c[0] = t0;
        if n >= 1 {
            c[1] = 1.0;
        }
        Series(c)
    }

    /// A polynomial in the variable `t₀ + h` with the given coefficients (lowest first),
    /// re-expanded around `t₀`.
    pub fn polynomial(coeffs: &[f64], t0: f64, n: usize) -> Self {
        let x = Series::variable(t0, n);
        let mut acc = Series::constant(0.0, n);
        for &c in coeffs.iter().rev() {
            acc = &(&acc * &x) + c;
        }
        acc
    }

    /// Truncation order `n` (the series has `n + 1` coefficients).
    pub fn order(&self) -> usize {
        self.0.len() - 1
    }

    /// The value at the expansion point, `c_0`.
    pub fn value(&self) -> f64 {
        self.0[0]
    }

    /// The k-th derivative at the expansion point, `k! · c_k`.
    pub fn derivative(&self, k: usize) -> f64 {
        let mut f = 1.0;
        for i in 2..=k {
            f *= i as f64;
        }
        self.0[k] * f
    }

    /// The truncated polynomial `Σ_{k ≤ m} c_k hᵏ` (Horner), with `m ≤ n`.
    pub fn eval_to(&self, h: f64, m: usize) -> f64 {
        self.0[..=m.min(self.order())]
            .iter()
            .rev()
            .fold(0.0, |acc, &c| acc * h + c)
    }

    /// The full truncated polynomial `Σ_{k ≤ n} c_k hᵏ`.
    pub fn eval(&self, h: f64) -> f64 {
        self.eval_to(h, self.order())
    }

    fn zip_order(&self, other: &Series) -> usize {
        assert_eq!(
            self.order(),
            other.order(),
            "series of different truncation orders"
        );
        self.order()
    }

    /// `exp(a)`: `e_0 = exp(a_0)`, `e_k = (1/k) Σ_{j=1..k} j a_j e_{k-j}`.
    pub fn exp(&self) -> Series {
        let a = &self.0;
        let n = self.order();
        let mut e = vec![0.0; n + 1];
        e[0] = a[0].exp();
        for k in 1..=n {
            let s: f64 = (1..=k).map(|j| j as f64 * a[j] * e[k - j]).sum();
            e[k] = s / k as f64;
        }
        Series(e)
    }

    /// `1 − exp(a)`, with the constant term computed as `−expm1(a_0)` so that it keeps
    /// full relative precision when `a_0 → 0` (σ² = 1 − ᾱ near t = 0).
    pub fn one_minus_exp(&self) -> Series {
        let mut e = self.exp();
        for c in e.0.iter_mut() {
            *c = -*c;
        }
        e.0[0] = -self.0[0].exp_m1();
        e
    }

    /// `ln(a)` for `a_0 > 0`: `l_k = (a_k − (1/k) Σ_{j=1..k-1} j l_j a_{k-j}) / a_0`.
    pub fn ln(&self) -> Series {
        let a = &self.0;
        let n = self.order();
        let mut l = vec![0.0; n + 1];
        l[0] = a[0].ln();
        for k in 1..=n {
            let s: f64 = (1..k).map(|j| j as f64 * l[j] * a[k - j]).sum();
            l[k] = (a[k] - s / k as f64) / a[0];
        }
        Series(l)
    }

    /// `a^p` for `a_0 > 0`:
    /// `b_k = (1/(k a_0)) Σ_{j=1..k} (p j − (k − j)) a_j b_{k-j}`.
    pub fn powf(&self, p: f64) -> Series {
        let a = &self.0;
        let n = self.order();
        let mut b = vec![0.0; n + 1];
        b[0] = a[0].powf(p);
        for k in 1..=n {
            let s: f64 = (1..=k)
                .map(|j| (p * j as f64 - (k - j) as f64) * a[j] * b[k - j])
                .sum();
            b[k] = s / (k as f64 * a[0]);
        }
        Series(b)
    }

    /// `sqrt(a)` for `a_0 > 0`: `s_k = (a_k − Σ_{j=1..k-1} s_j s_{k-j}) / (2 s_0)`.
    pub fn sqrt(&self) -> Series {
        let a = &self.0;
        let n = self.order();
        let mut s = vec![0.0; n + 1];
        s[0] = a[0].sqrt();
        for k in 1..=n {
            let c: f64 = (1..k).map(|j| s[j] * s[k - j]).sum();
            s[k] = (a[k] - c) / (2.0 * s[0]);
        }
        Series(s)
    }

    /// `(sin(a), cos(a))`: `s_k = (1/k) Σ j a_j c_{k-j}`, `c_k = −(1/k) Σ j a_j s_{k-j}`.
    pub fn sin_cos(&self) -> (Series, Series) {
        let a = &self.0;
        let n = self.order();
        let mut s = vec![0.0; n + 1];
        let mut c = vec![0.0; n + 1];
        s[0] = a[0].sin();
        c[0] = a[0].cos();
        for k in 1..=n {
            let (mut ss, mut cc) = (0.0, 0.0);
            for j in 1..=k {
                ss += j as f64 * a[j] * c[k - j];
                cc += j as f64 * a[j] * s[k - j];
            }
            s[k] = ss / k as f64;
            c[k] = -cc / k as f64;
        }
        (Series(s), Series(c))
    }

    /// The series of the derivative `f'`, one order shorter.
    pub fn differentiate(&self) -> Series {
        if self.order() == 0 {
            return Series(vec![0.0]);
        }
        Series((1..=self.order()).map(|k| k as f64 * self.0[k]).collect())
    }
}

impl Add for &Series {
    type Output = Series;
    fn add(self, rhs: &Series) -> Series {
        self.zip_order(rhs);
        Series(self.0.iter().zip(&rhs.0).map(|(a, b)| a + b).collect())
    }
}

impl Sub for &Series {
    type Output = Series;
    fn sub(self, rhs: &Series) -> Series {
        self.zip_order(rhs);
        Series(self.0.iter().zip(&rhs.0).map(|(a, b)| a - b).collect())
    }
}

/// Cauchy product.
impl Mul for &Series {
    type Output = Series;
    fn mul(self, rhs: &Series) -> Series {
        let n = self.zip_order(rhs);
        Series(
            (0..=n)
                .map(|k| (0..=k).map(|j| self.0[j] * rhs.0[k - j]).sum())
                .collect(),
        )
    }
}

/// `q_k = (a_k − Σ_{j<k} q_j b_{k-j}) / b_0`.
impl Div for &Series {
    type Output = Series;
    fn div(self, rhs: &Series) -> Series {
        let n = self.zip_order(rhs);
        let mut q = vec![0.0; n + 1];
        for k in 0..=n {
            let s: f64 = (0..k).map(|j| q[j] * rhs.0[k - j]).sum();
            q[k] = (self.0[k] - s) / rhs.0[0];
        }
        Series(q)
    }
}

impl Add<f64> for &Series {
    type Output = Series;
    fn add(self, rhs: f64) -> Series {
        let mut c = self.0.clone();
        c[0] += rhs;
        Series(c)
    }
}

impl Mul<f64> for &Series {
    type Output = Series;
    fn mul(self, rhs: f64) -> Series {
        Series(self.0.iter().map(|a| a * rhs).collect())
    }
}

impl Neg for &Series {
    type Output = Series;
    fn neg(self) -> Series {
        self * -1.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol * (1.0 + b.abs())
    }

    #[test]
    fn exp_of_variable_has_factorial_coefficients() {
        let e = Series::variable(0.3, 8).exp();
        let mut f = 1.0;
        for k in 0..=8 {
            if k > 0 {
                f *= k as f64;
            }
            assert!(close(e.0[k], 0.3f64.exp() / f, 1e-14));
        }
    }

    #[test]
    fn elementary_functions_match_their_closed_form_derivatives() {
        let t0 = 0.7;
        let x = Series::variable(t0, 6);
        // d^k/dt^k ln t = (-1)^{k-1} (k-1)! / t^k
        let l = x.ln();
        for k in 1..=6 {
            let fact: f64 = (1..k).map(|i| i as f64).product();
            let want = (-1f64).powi(k as i32 - 1) * fact / t0.powi(k as i32);
            assert!(close(l.derivative(k), want, 1e-12), "ln k={k}");
        }
        // sqrt and powf agree; sin/cos derivatives cycle.
        let s1 = x.sqrt();
        let s2 = x.powf(0.5);
        for k in 0..=6 {
            assert!(close(s1.0[k], s2.0[k], 1e-13));
        }
        let (s, c) = x.sin_cos();
        let cyc = [t0.sin(), t0.cos(), -t0.sin(), -t0.cos()];
        for k in 0..=6 {
            assert!(close(s.derivative(k), cyc[k % 4], 1e-12));
            assert!(close(c.derivative(k), cyc[(k + 1) % 4], 1e-12));
        }
    }

    #[test]
    fn division_inverts_multiplication() {
        let a = Series(vec![1.5, -0.3, 0.2, 0.7, -1.1]);
        let b = Series(vec![0.8, 0.4, -0.9, 0.1, 0.3]);
        let q = &(&a * &b) / &b;
        for k in 0..=4 {
            assert!(close(q.0[k], a.0[k], 1e-13));
        }
    }

    #[test]
    fn one_minus_exp_keeps_relative_precision_near_zero() {
        let a = Series(vec![-1e-12, -1.0, 0.0]);
        let r = a.one_minus_exp();
        assert!(close(r.0[0], 1e-12, 1e-10));
        assert!(close(r.0[1], 1.0, 1e-10));
    }
}
