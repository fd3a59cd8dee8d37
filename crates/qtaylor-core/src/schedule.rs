//! Noise schedules of VP diffusions (DESIGN §2, §7).
//!
//! A schedule is fixed by `L(t) = ln ᾱ(t)`, given as a truncated power series around any
//! `t` ([`Schedule::log_alpha_bar_series`]). Everything else is derived from it by series
//! arithmetic, to any order:
//!
//! - `α = exp(L/2)`, `σ = sqrt(1 − exp(L))` (constant term via `expm1`),
//! - `λ = ln(α/σ) = L/2 − ln(1 − exp(L))/2`,
//! - `β = −dL/dt`.

use std::fmt::Debug;

use anyhow::{Result, bail};

use crate::series::Series;

/// A VP noise schedule on continuous time `t ∈ (0, t_end]`.
pub trait Schedule: Debug + Send + Sync {
    /// Short name, as accepted by `--schedule`.
    fn name(&self) -> String;

    /// Taylor series of `L(t) = ln ᾱ(t)` around `t`, truncated at order `n`.
    fn log_alpha_bar_series(&self, t: f64, n: usize) -> Series;

    /// The largest usable `t`, the default `t_max` (ᾱ > 0 there, except on rectified flow,
    /// which ends at pure noise, ᾱ = 0).
    fn t_end(&self) -> f64 {
        1.0
    }

    /// The schedule's own default final time of a continuous grid, where it has one (VE:
    /// EDM's σ_min); `None`: the front end's default.
    fn default_t_min(&self) -> Option<f64> {
        None
    }

    /// `(L(t), L'(t))`. Schedules override it with closed forms: it is on the hot path of
    /// every scalar below (the series allocates).
    fn log_alpha_bar_and_slope(&self, t: f64) -> (f64, f64) {
        let s = self.log_alpha_bar_series(t, 1);
        (s.0[0], s.0[1])
    }

    /// `ln ᾱ(t)`.
    fn log_alpha_bar(&self, t: f64) -> f64 {
        self.log_alpha_bar_and_slope(t).0
    }

    /// `ᾱ(t)`.
    fn alpha_bar(&self, t: f64) -> f64 {
        self.log_alpha_bar(t).exp()
    }

    /// `α(t) = sqrt(ᾱ)`.
    fn alpha(&self, t: f64) -> f64 {
        (0.5 * self.log_alpha_bar(t)).exp()
    }

    /// `σ(t) = sqrt(1 − ᾱ)`.
    fn sigma(&self, t: f64) -> f64 {
        (-self.log_alpha_bar(t).exp_m1()).sqrt()
    }

    /// Log-SNR `λ(t) = ln(α/σ)`.
    fn lambda(&self, t: f64) -> f64 {
        let l = self.log_alpha_bar(t);
        0.5 * l - 0.5 * (-l.exp_m1()).ln()
    }

    /// `β(t) = −d ln ᾱ / dt`.
    fn beta(&self, t: f64) -> f64 {
        -self.log_alpha_bar_and_slope(t).1
    }

    /// Taylor series of `α` around `t`, order `n`.
    fn alpha_series(&self, t: f64, n: usize) -> Series {
        (&self.log_alpha_bar_series(t, n) * 0.5).exp()
    }

    /// Taylor series of `σ` around `t`, order `n`.
    fn sigma_series(&self, t: f64, n: usize) -> Series {
        self.log_alpha_bar_series(t, n).one_minus_exp().sqrt()
    }

    /// Taylor series of `λ` around `t`, order `n`.
    fn lambda_series(&self, t: f64, n: usize) -> Series {
        let l = self.log_alpha_bar_series(t, n);
        &(&l - &l.one_minus_exp().ln()) * 0.5
    }

    /// Taylor series of `β = −L'` around `t`, order `n`.
    fn beta_series(&self, t: f64, n: usize) -> Series {
        -&self.log_alpha_bar_series(t, n + 1).differentiate()
    }

    /// The model's state over the VP state at `t`: the model sees `state_scale(t) · x` where
    /// the samplers hold `x = α x0 + σ ε`. 1 on VP paths, `1/α` on the VE path ([`Ve`]),
    /// `1/(α + σ)` on rectified flow ([`Flow`]).
    fn state_scale(&self, _t: f64) -> f64 {
        1.0
    }

    /// Taylor series, order `n`, of the model state's coefficients `(c α, c σ)` with
    /// `c = state_scale`: the model's state is `c α x0 + c σ ε`. VP: `(α, σ)`; VE: `(1, t)`;
    /// flow: `(1 − ς, ς)`.
    fn state_series(&self, t: f64, n: usize) -> (Series, Series) {
        (self.alpha_series(t, n), self.sigma_series(t, n))
    }

    /// The noise level at `t` in the model's own terms (the inverse of
    /// [`Schedule::time_of_level`]): σ/α = e^{−λ} on VP and VE paths, ς on rectified flow.
    fn level(&self, t: f64) -> f64 {
        (-self.lambda(t)).exp()
    }

    /// The time of a noise level in the model's own terms: σ/α on VP and VE paths (diffusers'
    /// `sigmas`, `λ = −ln level`), ς on rectified flow. Level 0 is t = 0 (σ = 0).
    fn time_of_level(&self, level: f64) -> Result<f64> {
        if level == 0.0 {
            return Ok(0.0);
        }
        if level.is_nan() || level < 0.0 {
            bail!("noise level {level} is not a positive number");
        }
        self.t_of_lambda(-level.ln())
    }

    /// True when a continuous grid on this schedule ends at σ = 0 by default (rectified
    /// flow: diffusers' flow schedulers append a terminal 0).
    fn final_zero_by_default(&self) -> bool {
        false
    }

    /// The network's time argument at `t`: `t` itself. Discrete schedules return the
    /// (fractional) diffusers timestep instead ([`Tabulated::network_time`]).
    fn network_time(&self, t: f64) -> f64 {
        t
    }

    /// The time whose [`Schedule::network_time`] is `n`.
    fn time_of_network_time(&self, n: f64) -> Result<f64> {
        if !(n.is_finite() && n > 0.0 && n <= self.t_end()) {
            bail!(
                "time {n} is outside the domain (0, {}] of schedule {}",
                self.t_end(),
                self.name()
            );
        }
        Ok(n)
    }

    /// The `t` at which `λ(t) = lambda` (λ is strictly decreasing in t): Newton's method
    /// safeguarded by bisection, to machine precision. Errors if `lambda` lies outside
    /// `[λ(t_end), λ(1e-12)]`.
    fn t_of_lambda(&self, lambda: f64) -> Result<f64> {
        let (mut lo, mut hi) = (1e-12, self.t_end());
        let (l_lo, l_hi) = (self.lambda(lo), self.lambda(hi));
        if !(lambda <= l_lo && lambda >= l_hi) {
            bail!(
                "log-SNR {lambda} is outside the range [{l_hi}, {l_lo}] of schedule {}",
                self.name()
            );
        }
        let mut t = 0.5 * (lo + hi);
        for _ in 0..200 {
            // λ = L/2 − ln(1 − e^L)/2, λ' = L'/(2(1 − e^L)).
            let (l, dl) = self.log_alpha_bar_and_slope(t);
            let one_minus = -l.exp_m1();
            let f = 0.5 * l - 0.5 * one_minus.ln() - lambda;
            let slope = 0.5 * dl / one_minus;
            if f == 0.0 {
                return Ok(t);
            }
            if f > 0.0 {
                lo = t;
            } else {
                hi = t;
            }
            let mut next = t - f / slope;
            if !(next > lo && next < hi) {
                next = 0.5 * (lo + hi);
            }
            if (next - t).abs() <= 4.0 * f64::EPSILON * t || hi - lo <= 4.0 * f64::EPSILON * hi {
                return Ok(next);
            }
            t = next;
        }
        Ok(t)
    }
}

/// Linear β (DDPM's schedule in continuous time): `β(t) = β_min + t (β_max − β_min)`,
/// `L(t) = −β_min t − ½ (β_max − β_min) t²`. Defaults 0.1 / 20 are the continuous limit
/// of DDPM's 1000 steps from 1e-4 to 0.02.
#[derive(Clone, Debug)]
pub struct VpLinear {
    pub beta_min: f64,
    pub beta_max: f64,
}

impl Default for VpLinear {
    fn default() -> Self {
        VpLinear {
            beta_min: 0.1,
            beta_max: 20.0,
        }
    }
}

impl Schedule for VpLinear {
    fn name(&self) -> String {
        "vp-linear".into()
    }
    fn log_alpha_bar_series(&self, t: f64, n: usize) -> Series {
        let d = self.beta_max - self.beta_min;
        Series::polynomial(&[0.0, -self.beta_min, -0.5 * d], t, n)
    }
    fn log_alpha_bar_and_slope(&self, t: f64) -> (f64, f64) {
        let d = self.beta_max - self.beta_min;
        (-(self.beta_min + 0.5 * d * t) * t, -(self.beta_min + d * t))
    }
}

/// Scaled-linear β (Stable Diffusion): `sqrt β` linear in t,
/// `β(t) = (a + (b − a) t)²` with `a = sqrt(N β_start)`, `b = sqrt(N β_end)`; defaults are
/// diffusers' `beta_start = 0.00085`, `beta_end = 0.012`, `N = 1000`.
/// `L(t) = −(a² t + a (b − a) t² + (b − a)² t³ / 3)`.
#[derive(Clone, Debug)]
pub struct ScaledLinear {
    pub sqrt_beta_min: f64,
    pub sqrt_beta_max: f64,
}

impl Default for ScaledLinear {
    fn default() -> Self {
        ScaledLinear {
            sqrt_beta_min: (0.00085f64 * 1000.0).sqrt(),
            sqrt_beta_max: (0.012f64 * 1000.0).sqrt(),
        }
    }
}

impl Schedule for ScaledLinear {
    fn name(&self) -> String {
        "scaled-linear".into()
    }
    fn log_alpha_bar_series(&self, t: f64, n: usize) -> Series {
        let a = self.sqrt_beta_min;
        let d = self.sqrt_beta_max - a;
        Series::polynomial(&[0.0, -a * a, -a * d, -d * d / 3.0], t, n)
    }
    fn log_alpha_bar_and_slope(&self, t: f64) -> (f64, f64) {
        let a = self.sqrt_beta_min;
        let d = self.sqrt_beta_max - a;
        let b = a + d * t;
        (-(a * a + (a * d + d * d * t / 3.0) * t) * t, -b * b)
    }
}

/// Cosine schedule (improved DDPM, Nichol & Dhariwal 2021):
/// `ᾱ(t) = f(t)/f(0)`, `f(t) = cos²(π/2 · (t + s)/(1 + s))`, `s = 0.008`.
/// `ᾱ(1) = 0`, so the usable end is `t_end = 0.9946` (the value DPM-Solver uses).
#[derive(Clone, Debug)]
pub struct Cosine {
    pub s: f64,
}

impl Default for Cosine {
    fn default() -> Self {
        Cosine { s: 0.008 }
    }
}

impl Schedule for Cosine {
    fn name(&self) -> String {
        "cosine".into()
    }
    fn t_end(&self) -> f64 {
        0.9946
    }
    fn log_alpha_bar_series(&self, t: f64, n: usize) -> Series {
        let k = std::f64::consts::FRAC_PI_2 / (1.0 + self.s);
        let theta = Series::polynomial(&[k * self.s, k], t, n);
        let (_, c) = theta.sin_cos();
        let c0 = (k * self.s).cos();
        &(&c.ln() * 2.0) + (-2.0 * c0.ln())
    }
    fn log_alpha_bar_and_slope(&self, t: f64) -> (f64, f64) {
        let k = std::f64::consts::FRAC_PI_2 / (1.0 + self.s);
        let theta = k * (t + self.s);
        (
            2.0 * (theta.cos().ln() - (k * self.s).cos().ln()),
            -2.0 * k * theta.tan(),
        )
    }
}

/// The variance-exploding path of EDM and k-diffusion (`x = x0 + ς ε`, ς ∈ (0, ς_max]) in
/// VP coordinates: time is the VE noise level itself, `t = ς = σ/α`, so
/// `ᾱ(t) = 1/(1 + t²)`, `L(t) = −ln(1 + t²)`, `λ(t) = −ln t`, and the VP state is
/// `x/√(1 + t²)` (the scaling of diffusers' `scale_model_input`). The network's time is
/// `t = ς` ([`Schedule::network_time`]'s default). t = 0 is σ = 0, the data.
#[derive(Clone, Debug)]
pub struct Ve {
    pub sigma_max: f64,
}

impl Ve {
    /// Errors unless `sigma_max` is finite and positive.
    pub fn new(sigma_max: f64) -> Result<Self> {
        if !(sigma_max > 0.0 && sigma_max.is_finite()) {
            bail!("ve schedule: sigma_max {sigma_max} must be a positive number");
        }
        Ok(Ve { sigma_max })
    }
}

impl Schedule for Ve {
    fn name(&self) -> String {
        format!("ve(sigma_max={})", self.sigma_max)
    }
    fn t_end(&self) -> f64 {
        self.sigma_max
    }
    /// EDM's σ_min = 0.002.
    fn default_t_min(&self) -> Option<f64> {
        Some(0.002)
    }
    fn log_alpha_bar_series(&self, t: f64, n: usize) -> Series {
        &Series::polynomial(&[1.0, 0.0, 1.0], t, n).ln() * -1.0
    }
    fn log_alpha_bar_and_slope(&self, t: f64) -> (f64, f64) {
        (-(t * t).ln_1p(), -2.0 * t / (1.0 + t * t))
    }
    fn lambda(&self, t: f64) -> f64 {
        -t.ln()
    }
    fn state_scale(&self, t: f64) -> f64 {
        (1.0 + t * t).sqrt()
    }
    fn state_series(&self, t: f64, n: usize) -> (Series, Series) {
        (Series::constant(1.0, n), Series::variable(t, n))
    }
}

/// Rectified flow, the path of SD3 and Flux (Liu et al. 2022, "Flow Straight and Fast";
/// Esser et al. 2024, "Scaling Rectified Flow Transformers", §2 and §5.3.2):
/// `x = (1 − ς) x0 + ς ε`, ς ∈ [0, 1], with diffusers' time shift. Time `t = u ∈ (0, 1]` is
/// the unshifted flow time; the noise level is
///
/// `ς(u) = s u / (1 + (s − 1) u)` ([`shift_sigma`]),
///
/// which is diffusers' static `shift` s, and also its dynamic shifts: `time_shift_type
/// "exponential"` with `mu` is `s = e^μ`, `"linear"` is `s = μ` (both map ς the same way).
/// A grid uniform in t is diffusers' default shifted grid.
///
/// In VP coordinates the path is `r·(α x0 + σ ε)` with `r = √((1 − ς)² + ς²)`:
/// `α = (1 − ς)/r`, `σ = ς/r`, `ᾱ = (1 − ς)²/r²`, `λ = ln((1 − ς)/ς)`; the model's state
/// is the VP state times `r = 1/(α + σ)` ([`Schedule::state_scale`]). At u = 1, ς = 1: ᾱ = 0
/// and λ = −∞ (pure noise, where diffusers' flow samplers start); α and σ stay analytic
/// there (their series are written in ς, not through `ln ᾱ`). The network time is
/// `1000 ς` (diffusers passes `timesteps = ς·1000`).
#[derive(Clone, Debug)]
pub struct Flow {
    pub shift: f64,
}

/// diffusers' flow time shift `ς = s u / (1 + (s − 1) u)` of `u ∈ [0, 1]`.
pub fn shift_sigma(shift: f64, u: f64) -> f64 {
    shift * u / (1.0 + (shift - 1.0) * u)
}

/// The inverse of [`shift_sigma`]: `u = ς / (s − (s − 1) ς)`.
pub fn unshift_sigma(shift: f64, sigma: f64) -> f64 {
    sigma / (shift - (shift - 1.0) * sigma)
}

/// How a flow schedule's `mu` shifts by default (diffusers' `time_shift_type`).
pub const DEFAULT_TIME_SHIFT: &str = "exponential";

/// The network time of a flow model at level ς: `1000 ς`, diffusers' `timesteps`.
pub const FLOW_TIMESTEP_SCALE: f64 = 1000.0;

impl Flow {
    /// Errors unless `shift` is finite and positive (it names the key).
    pub fn new(shift: f64) -> Result<Self> {
        if !(shift > 0.0 && shift.is_finite()) {
            crate::bail_option!(
                (crate::keys::SHIFT, shift),
                ": the flow time shift must be a positive number (1 = no shift)"
            );
        }
        Ok(Flow { shift })
    }

    /// The schedule of diffusers' dynamic shift `mu` of `time_shift_type` ("exponential":
    /// `s = e^μ`, "linear": `s = μ`).
    pub fn from_mu(mu: f64, time_shift: &str) -> Result<Self> {
        if !mu.is_finite() {
            crate::bail_option!((crate::keys::MU, mu), ": expected a finite number");
        }
        match time_shift {
            "exponential" => Flow::new(mu.exp()),
            "linear" => {
                if mu <= 0.0 {
                    crate::bail_option!(
                        (crate::keys::MU, mu),
                        ": the linear time shift needs mu > 0"
                    );
                }
                Flow::new(mu)
            }
            other => crate::bail_option!(
                (crate::keys::TIME_SHIFT, other),
                ": expected exponential or linear"
            ),
        }
    }

    /// The schedule of the settings as a front end takes them: `shift`, or `mu` with
    /// `time_shift` (default exponential; it applies to `mu` only), not both; neither is
    /// shift 1.
    pub fn from_settings(
        shift: Option<f64>,
        mu: Option<f64>,
        time_shift: Option<&str>,
    ) -> Result<Self> {
        match (shift, mu) {
            (Some(_), Some(_)) => {
                crate::bail_option!(
                    "give ",
                    crate::keys::SHIFT,
                    " or ",
                    crate::keys::MU,
                    ", not both (mu is diffusers' dynamic shift)"
                )
            }
            (_, Some(mu)) => Flow::from_mu(mu, time_shift.unwrap_or(DEFAULT_TIME_SHIFT)),
            (shift, None) => {
                if let Some(ts) = time_shift {
                    crate::bail_option!(
                        (crate::keys::TIME_SHIFT, ts),
                        " applies to ",
                        crate::keys::MU
                    );
                }
                Flow::new(shift.unwrap_or(1.0))
            }
        }
    }

    /// ς(t).
    pub fn flow_sigma(&self, t: f64) -> f64 {
        shift_sigma(self.shift, t)
    }

    /// The series of ς around `t`, order `n`.
    fn flow_sigma_series(&self, t: f64, n: usize) -> Series {
        let s = self.shift;
        &Series::polynomial(&[0.0, s], t, n) / &Series::polynomial(&[1.0, s - 1.0], t, n)
    }

    /// `(1 − ς, ς, 1/r)` as series: α = (1 − ς)/r and σ = ς/r.
    fn parts(&self, t: f64, n: usize) -> (Series, Series, Series) {
        let sig = self.flow_sigma_series(t, n);
        let one_minus = &(-&sig) + 1.0;
        let r2 = &(&one_minus * &one_minus) + &(&sig * &sig);
        (one_minus, sig, r2.powf(-0.5))
    }
}

impl Schedule for Flow {
    fn name(&self) -> String {
        format!("flow(shift={})", self.shift)
    }
    fn log_alpha_bar_series(&self, t: f64, n: usize) -> Series {
        let (one_minus, sig, _) = self.parts(t, n);
        let r2 = &(&one_minus * &one_minus) + &(&sig * &sig);
        &(&one_minus.ln() * 2.0) - &r2.ln()
    }
    fn log_alpha_bar_and_slope(&self, t: f64) -> (f64, f64) {
        let s = self.shift;
        let g = self.flow_sigma(t);
        let dg = s / (1.0 + (s - 1.0) * t).powi(2);
        let r2 = (1.0 - g) * (1.0 - g) + g * g;
        let l = 2.0 * (1.0 - g).ln() - r2.ln();
        let dl_dg = -2.0 / (1.0 - g) - 2.0 * (2.0 * g - 1.0) / r2;
        (l, dl_dg * dg)
    }
    fn alpha(&self, t: f64) -> f64 {
        let g = self.flow_sigma(t);
        (1.0 - g) / ((1.0 - g) * (1.0 - g) + g * g).sqrt()
    }
    fn sigma(&self, t: f64) -> f64 {
        let g = self.flow_sigma(t);
        g / ((1.0 - g) * (1.0 - g) + g * g).sqrt()
    }
    fn lambda(&self, t: f64) -> f64 {
        let g = self.flow_sigma(t);
        (1.0 - g).ln() - g.ln()
    }
    fn alpha_series(&self, t: f64, n: usize) -> Series {
        let (one_minus, _, inv_r) = self.parts(t, n);
        &one_minus * &inv_r
    }
    fn sigma_series(&self, t: f64, n: usize) -> Series {
        let (_, sig, inv_r) = self.parts(t, n);
        &sig * &inv_r
    }
    fn lambda_series(&self, t: f64, n: usize) -> Series {
        let (one_minus, sig, _) = self.parts(t, n);
        &one_minus.ln() - &sig.ln()
    }
    fn state_series(&self, t: f64, n: usize) -> (Series, Series) {
        let (one_minus, sig, _) = self.parts(t, n);
        (one_minus, sig)
    }
    fn state_scale(&self, t: f64) -> f64 {
        let g = self.flow_sigma(t);
        ((1.0 - g) * (1.0 - g) + g * g).sqrt()
    }
    fn network_time(&self, t: f64) -> f64 {
        FLOW_TIMESTEP_SCALE * self.flow_sigma(t)
    }
    fn final_zero_by_default(&self) -> bool {
        true
    }
    fn time_of_network_time(&self, n: f64) -> Result<f64> {
        if !(n.is_finite() && n > 0.0 && n <= FLOW_TIMESTEP_SCALE) {
            bail!(
                "network time {n} is outside the domain (0, {FLOW_TIMESTEP_SCALE}] of schedule {} (timesteps are 1000 ς)",
                self.name()
            );
        }
        Ok(unshift_sigma(self.shift, n / FLOW_TIMESTEP_SCALE))
    }
    fn level(&self, t: f64) -> f64 {
        self.flow_sigma(t)
    }
    /// The level is ς itself: `u = ` [`unshift_sigma`]`(ς)`, for ς ∈ [0, 1].
    fn time_of_level(&self, level: f64) -> Result<f64> {
        if !(0.0..=1.0).contains(&level) {
            bail!(
                "flow sigma {level} is outside [0, 1] (x = (1 - sigma) x0 + sigma eps; 1 is pure noise)"
            );
        }
        Ok(unshift_sigma(self.shift, level))
    }
    /// Closed form: `ς = 1/(1 + e^λ)`, then u = [`unshift_sigma`].
    fn t_of_lambda(&self, lambda: f64) -> Result<f64> {
        if lambda.is_nan() {
            bail!(
                "log-SNR {lambda} is not a number (schedule {})",
                self.name()
            );
        }
        let g = 1.0 / (1.0 + lambda.exp());
        if !(g > 0.0 && g <= 1.0) {
            bail!(
                "log-SNR {lambda} is outside the range of schedule {}",
                self.name()
            );
        }
        Ok(unshift_sigma(self.shift, g))
    }
}

/// A tabulated discrete schedule `ᾱ_0 … ᾱ_{N−1}` (e.g. from a checkpoint's scheduler
/// config) placed at `t_n = (n + 1)/N` (DESIGN §2).
///
/// Interpolant: the natural cubic spline of `L = ln ᾱ` through `(0, 0)` and the `N` knots.
/// It is C² and reproduces every tabulated value exactly; inside a knot interval the
/// derivatives of order ≥ 4 are zero (the spline is a cubic there).
#[derive(Clone, Debug)]
pub struct Tabulated {
    name: String,
    /// Knot abscissae `0, 1/N, …, 1`.
    knots: Vec<f64>,
    /// λ at the N tabulated steps (decreasing): the table of [`Tabulated::network_time`].
    lambdas: Vec<f64>,
    /// Per interval: the cubic's coefficients around its left knot.
    pieces: Vec<[f64; 4]>,
}

impl Tabulated {
    /// From `ᾱ_n`, which must lie in (0, 1) and decrease strictly.
    pub fn from_alpha_bars(name: &str, alpha_bars: &[f64]) -> Result<Self> {
        let n = alpha_bars.len();
        if n < 2 {
            bail!("a tabulated schedule needs at least 2 values of alpha_bar, got {n}");
        }
        for (i, &a) in alpha_bars.iter().enumerate() {
            if !(a > 0.0 && a < 1.0) {
                bail!("alpha_bar[{i}] = {a} is outside (0, 1)");
            }
            if i > 0 && a >= alpha_bars[i - 1] {
                bail!(
                    "alpha_bar must decrease strictly, but alpha_bar[{i}] = {a} >= alpha_bar[{}] = {}",
                    i - 1,
                    alpha_bars[i - 1]
                );
            }
        }
        let mut xs = vec![0.0];
        let mut ys = vec![0.0];
        for (i, &a) in alpha_bars.iter().enumerate() {
            xs.push((i + 1) as f64 / n as f64);
            ys.push(a.ln());
        }
        let lambdas = alpha_bars
            .iter()
            .map(|&a| 0.5 * a.ln() - 0.5 * (1.0 - a).ln())
            .collect();
        Ok(Tabulated {
            name: name.to_string(),
            pieces: natural_cubic_spline(&xs, &ys),
            knots: xs,
            lambdas,
        })
    }

    /// From discrete betas: `ᾱ_n = Π_{i ≤ n} (1 − β_i)`.
    pub fn from_betas(name: &str, betas: &[f64]) -> Result<Self> {
        let mut acc = 0.0f64;
        let mut abar = Vec::with_capacity(betas.len());
        for (i, &b) in betas.iter().enumerate() {
            if !(b > 0.0 && b < 1.0) {
                bail!("beta[{i}] = {b} is outside (0, 1)");
            }
            acc += (-b).ln_1p();
            abar.push(acc.exp());
        }
        Self::from_alpha_bars(name, &abar)
    }

    /// The spline piece that holds t, and t's offset from the piece's knot.
    fn piece(&self, t: f64) -> ([f64; 4], f64) {
        let last = self.pieces.len() - 1;
        let i = self
            .knots
            .partition_point(|&k| k <= t)
            .saturating_sub(1)
            .min(last);
        (self.pieces[i], t - self.knots[i])
    }

    /// Number of tabulated steps `N`.
    pub fn len(&self) -> usize {
        self.knots.len() - 1
    }

    /// Always false: a table has at least two entries.
    pub fn is_empty(&self) -> bool {
        false
    }
}

impl Schedule for Tabulated {
    fn name(&self) -> String {
        self.name.clone()
    }

    /// The fractional diffusers timestep of `t`: `log σ/α = −λ(t)` interpolated linearly
    /// over the table of the N trained steps, clamped to `[0, N − 1]` (diffusers'
    /// `_sigma_to_t`, used by its `use_karras_sigmas` / `sigmas=` grids). At the tabulated
    /// times `t = (n + 1)/N` it is exactly `n`.
    fn network_time(&self, t: f64) -> f64 {
        let l = self.lambda(t);
        let lam = &self.lambdas;
        let last = lam.len() - 1;
        if l >= lam[0] {
            return 0.0;
        }
        if l <= lam[last] {
            return last as f64;
        }
        // First index whose λ is below l: the interval is [k − 1, k].
        let k = lam.partition_point(|&v| v >= l).clamp(1, last);
        let w = (lam[k - 1] - l) / (lam[k - 1] - lam[k]);
        (k - 1) as f64 + w.clamp(0.0, 1.0)
    }

    /// The time at fractional diffusers timestep `n ∈ [0, N − 1]`: λ interpolated linearly
    /// between the neighbouring steps, then inverted on the spline (the inverse of
    /// [`Tabulated::network_time`]). Integer `n` gives `(n + 1)/N` exactly.
    fn time_of_network_time(&self, n: f64) -> Result<f64> {
        let last = self.lambdas.len() - 1;
        if !(n.is_finite() && n >= 0.0 && n <= last as f64) {
            bail!(
                "timestep {n} is outside [0, {last}] of the {}-step table",
                last + 1
            );
        }
        if n == n.floor() {
            return Ok((n + 1.0) / self.len() as f64);
        }
        let k = n.floor() as usize;
        let w = n - k as f64;
        let l = (1.0 - w) * self.lambdas[k] + w * self.lambdas[k + 1];
        self.t_of_lambda(l)
    }
    fn log_alpha_bar_series(&self, t: f64, n: usize) -> Series {
        let (p, u) = self.piece(t);
        // The cubic around its knot, re-expanded around t.
        Series::polynomial(&p, u, n)
    }
    fn log_alpha_bar_and_slope(&self, t: f64) -> (f64, f64) {
        let ([a, b, c, d], u) = self.piece(t);
        (
            a + u * (b + u * (c + u * d)),
            b + u * (2.0 * c + 3.0 * d * u),
        )
    }
}

/// Natural cubic spline through `(xs, ys)`: per interval `[x_i, x_{i+1}]` the coefficients
/// `[a, b, c, d]` of `a + b h + c h² + d h³`, `h = x − x_i`.
fn natural_cubic_spline(xs: &[f64], ys: &[f64]) -> Vec<[f64; 4]> {
    let n = xs.len() - 1;
    let h: Vec<f64> = (0..n).map(|i| xs[i + 1] - xs[i]).collect();
    // Second derivatives m_i with m_0 = m_n = 0 (tridiagonal solve, Thomas algorithm).
    let mut m = vec![0.0; n + 1];
    if n >= 2 {
        let k = n - 1;
        let mut diag = vec![0.0; k];
        let mut rhs = vec![0.0; k];
        let mut upper = vec![0.0; k];
        for j in 0..k {
            let i = j + 1;
            diag[j] = 2.0 * (h[i - 1] + h[i]);
            upper[j] = h[i];
            rhs[j] = 6.0 * ((ys[i + 1] - ys[i]) / h[i] - (ys[i] - ys[i - 1]) / h[i - 1]);
        }
        for j in 1..k {
            let w = h[j] / diag[j - 1];
            diag[j] -= w * upper[j - 1];
            rhs[j] -= w * rhs[j - 1];
        }
        m[k] = rhs[k - 1] / diag[k - 1];
        for j in (0..k - 1).rev() {
            m[j + 1] = (rhs[j] - upper[j] * m[j + 2]) / diag[j];
        }
    }
    (0..n)
        .map(|i| {
            let a = ys[i];
            let b = (ys[i + 1] - ys[i]) / h[i] - h[i] * (2.0 * m[i] + m[i + 1]) / 6.0;
            let c = m[i] / 2.0;
            let d = (m[i + 1] - m[i]) / (6.0 * h[i]);
            [a, b, c, d]
        })
        .collect()
}

/// `torch.linspace(start, end, n, dtype=float32)`, element by element as PyTorch computes
/// it: `step = (end − start)/(n − 1)` in f32, the first half `start + step·i`, the second
/// half `end − step·(n − 1 − i)`, each rounded once to f32.
pub fn torch_linspace_f32(start: f64, end: f64, n: usize) -> Vec<f32> {
    let (s, e) = (start as f32, end as f32);
    if n == 1 {
        return vec![s];
    }
    let step = (e - s) / (n - 1) as f32;
    (0..n)
        .map(|i| {
            if i < n / 2 {
                step.mul_add(i as f32, s)
            } else {
                (-step).mul_add((n - 1 - i) as f32, e)
            }
        })
        .collect()
}

/// The most training timesteps a discrete schedule may have (a stated limit: diffusers'
/// models use 1000, a few 4000; a table is built per step).
pub const MAX_TRAIN_TIMESTEPS: usize = 1 << 16;

/// The discrete betas of a diffusers `beta_schedule` (`linear`, `scaled_linear`,
/// `squaredcos_cap_v2`), in diffusers' float32.
pub fn diffusers_betas(
    beta_schedule: &str,
    beta_start: f64,
    beta_end: f64,
    n: usize,
) -> Result<Vec<f32>> {
    if n < 2 {
        bail!("num_train_timesteps = {n}: expected at least 2");
    }
    if n > MAX_TRAIN_TIMESTEPS {
        bail!("num_train_timesteps = {n} exceeds the limit of {MAX_TRAIN_TIMESTEPS}");
    }
    Ok(match beta_schedule {
        "linear" => torch_linspace_f32(beta_start, beta_end, n),
        "scaled_linear" => torch_linspace_f32(beta_start.sqrt(), beta_end.sqrt(), n)
            .into_iter()
            .map(|b| b * b)
            .collect(),
        "squaredcos_cap_v2" => {
            let f = |t: f64| {
                ((t + 0.008) / 1.008 * std::f64::consts::FRAC_PI_2)
                    .cos()
                    .powi(2)
            };
            (0..n)
                .map(|i| {
                    let (t1, t2) = (i as f64 / n as f64, (i + 1) as f64 / n as f64);
                    (1.0 - f(t2) / f(t1)).min(0.999) as f32
                })
                .collect()
        }
        other => bail!(
            "beta_schedule '{other}' is not supported; expected linear, scaled_linear or squaredcos_cap_v2"
        ),
    })
}

/// `alphas_cumprod` as diffusers computes it: `1 − β` in f32, the running product
/// accumulated in f64 and each prefix rounded to f32 (bit-exact with torch.cumprod on CPU).
pub fn diffusers_alphas_cumprod(betas: &[f32]) -> Vec<f64> {
    let mut acc = 1.0f64;
    betas
        .iter()
        .map(|&b| {
            acc *= (1.0f32 - b) as f64;
            acc as f32 as f64
        })
        .collect()
}

/// diffusers' `rescale_zero_terminal_snr`: Lin et al. 2024, "Common Diffusion Noise
/// Schedules and Sample Steps are Flawed", Algorithm 1, in float32 as diffusers computes it.
/// With `s_n = √ᾱ_n`, shift the last to 0 and keep the first:
/// `s'_n = (s_n − s_T) · s_1 / (s_1 − s_T)`; then `ᾱ' = s'²`, `α'_1 = ᾱ'_1`,
/// `α'_n = ᾱ'_n / ᾱ'_{n−1}`, `β' = 1 − α'` (so `β'_T = 1` and `ᾱ'_T = 0`: zero terminal SNR).
pub fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let sqrt: Vec<f32> = diffusers_alphas_cumprod(betas)
        .iter()
        .map(|&a| (a as f32).sqrt())
        .collect();
    let (first, last) = (sqrt[0], sqrt[sqrt.len() - 1]);
    let scale = first / (first - last);
    let abar: Vec<f32> = sqrt
        .iter()
        .map(|&v| {
            let r = (v - last) * scale;
            r * r
        })
        .collect();
    let mut out = Vec::with_capacity(abar.len());
    out.push(1.0 - abar[0]);
    for n in 1..abar.len() {
        out.push(1.0 - abar[n] / abar[n - 1]);
    }
    out
}

/// ᾱ_T that diffusers' Euler, Euler ancestral, DPM-Solver multistep and UniPC schedulers
/// put in place of the 0 of a zero-terminal-SNR table (σ_max = √(2²⁴ − 1) ≈ 4096).
pub const ZERO_SNR_LAST_ALPHA_BAR: f64 = 1.0 / 16_777_216.0;

impl Tabulated {
    /// A discrete schedule from a diffusers beta schedule rescaled to zero terminal SNR
    /// ([`rescale_zero_terminal_snr`]), its last ᾱ (0) replaced by
    /// [`ZERO_SNR_LAST_ALPHA_BAR`] as diffusers' σ-space and multistep schedulers do (a
    /// schedule needs ᾱ > 0: λ = −∞ at ᾱ = 0). Returns the schedule and the rescaled betas.
    pub fn diffusers_zero_snr(betas: &[f32]) -> Result<(Self, Vec<f32>)> {
        let rescaled = rescale_zero_terminal_snr(betas);
        let mut abar = diffusers_alphas_cumprod(&rescaled);
        let n = abar.len();
        if n >= 2 && abar[n - 2] <= ZERO_SNR_LAST_ALPHA_BAR {
            bail!(
                "'rescale_betas_zero_snr' = true on these betas gives alpha_bar[{}] = {:e}, below the 2^-24 that \
                 diffusers puts at the last step: its table does not decrease there (sigma falls again at the \
                 last step), which no schedule here represents; use a beta schedule whose rescaled alpha_bar stays \
                 above 2^-24 before the last step (e.g. scaled_linear 0.00085..0.012, Stable Diffusion's)",
                n - 2,
                abar[n - 2]
            );
        }
        abar[n - 1] = ZERO_SNR_LAST_ALPHA_BAR;
        Ok((Self::from_alpha_bars("discrete", &abar)?, rescaled))
    }

    /// A discrete schedule from a diffusers beta schedule (see [`diffusers_betas`]).
    pub fn diffusers(
        beta_schedule: &str,
        beta_start: f64,
        beta_end: f64,
        n: usize,
    ) -> Result<Self> {
        let betas = diffusers_betas(beta_schedule, beta_start, beta_end, n)?;
        Self::from_alpha_bars("discrete", &diffusers_alphas_cumprod(&betas))
    }
}

/// A continuous schedule by name (vp-linear with its β range, cosine, scaled-linear).
pub fn schedule_by_name(name: &str, beta_min: f64, beta_max: f64) -> Result<Box<dyn Schedule>> {
    Ok(match name {
        "vp-linear" => {
            if !(beta_min > 0.0 && beta_max > beta_min) {
                crate::bail_option!(
                    (crate::keys::BETA_MIN, beta_min),
                    " / ",
                    (crate::keys::BETA_MAX, beta_max),
                    ": expected 0 < beta_min < beta_max"
                );
            }
            Box::new(VpLinear { beta_min, beta_max })
        }
        "cosine" => Box::new(Cosine::default()),
        "scaled-linear" => Box::new(ScaledLinear::default()),
        other => {
            crate::bail_option!(
                (crate::keys::SCHEDULE, other),
                ": unknown schedule; expected one of: vp-linear, cosine, scaled-linear, discrete, flow, ve"
            )
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_terminal_snr_rescaling_ends_at_zero_snr_and_keeps_the_first_step() {
        // Lin et al. 2024, Algorithm 1: √ᾱ' is affine in √ᾱ, 0 at the last step and equal
        // at the first; recomputed here in f64 from the definition.
        let betas = diffusers_betas("scaled_linear", 0.00085, 0.012, 1000).unwrap();
        let got = rescale_zero_terminal_snr(&betas);
        assert_eq!(got[999], 1.0);
        let s: Vec<f64> = diffusers_alphas_cumprod(&betas)
            .iter()
            .map(|a| a.sqrt())
            .collect();
        let (s1, st) = (s[0], s[999]);
        let abar = |n: usize| ((s[n] - st) * s1 / (s1 - st)).powi(2);
        for n in [0usize, 1, 10, 500, 998] {
            let want = if n == 0 {
                1.0 - abar(0)
            } else {
                1.0 - abar(n) / abar(n - 1)
            };
            // f32 as in diffusers: 1 − ᾱ'_n/ᾱ'_{n−1} loses a few ulps of 1, and near the end
            // √ᾱ_n − √ᾱ_T cancels (bit-equality with diffusers: python/tests/test_drop_in.py)
            let tol = 1e-6 + 1e-4 * want;
            assert!(
                (got[n] as f64 - want).abs() <= tol,
                "{n}: {} vs {want}",
                got[n]
            );
        }
        // linear 1e-4..0.02: the rescaled ᾱ_998 = 4e-9 lies below diffusers' ᾱ_T = 2⁻²⁴
        let linear = diffusers_betas("linear", 1e-4, 0.02, 1000).unwrap();
        let err = Tabulated::diffusers_zero_snr(&linear)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("'rescale_betas_zero_snr'") && err.contains("alpha_bar[998]"),
            "{err}"
        );
        let (table, _) = Tabulated::diffusers_zero_snr(&betas).unwrap();
        assert!((table.alpha_bar(1.0) - ZERO_SNR_LAST_ALPHA_BAR).abs() < 1e-18);
        let a1 = diffusers_alphas_cumprod(&betas)[0];
        assert!((table.alpha_bar(1.0 / 1000.0) - a1).abs() < 1e-6 * a1);
    }

    /// Central finite difference of order k (k ≤ 3) of f at t with step h.
    fn fd(f: &dyn Fn(f64) -> f64, t: f64, h: f64, k: usize) -> f64 {
        match k {
            1 => (f(t + h) - f(t - h)) / (2.0 * h),
            2 => (f(t + h) - 2.0 * f(t) + f(t - h)) / (h * h),
            3 => {
                (f(t + 2.0 * h) - 2.0 * f(t + h) + 2.0 * f(t - h) - f(t - 2.0 * h))
                    / (2.0 * h * h * h)
            }
            _ => unreachable!(),
        }
    }

    #[test]
    fn ve_time_is_the_noise_level_and_its_vp_state_is_scaled_by_one_over_sqrt_one_plus_t2() {
        let s = Ve::new(80.0).unwrap();
        for t in [0.002, 0.3, 1.0, 14.6, 80.0] {
            assert!((s.sigma(t) / s.alpha(t) - t).abs() < 1e-12 * t, "{t}");
            assert!((s.alpha(t) - 1.0 / (1.0 + t * t).sqrt()).abs() < 1e-15);
            assert!((s.t_of_lambda(s.lambda(t)).unwrap() - t).abs() < 1e-12 * t);
            assert_eq!(s.network_time(t), t);
        }
        assert_eq!(s.sigma(0.0), 0.0);
        assert!(Ve::new(0.0).is_err() && Ve::new(f64::NAN).is_err());
    }

    #[test]
    fn series_derivatives_match_finite_differences_for_every_schedule() {
        let scheds: Vec<Box<dyn Schedule>> = vec![
            Box::new(VpLinear::default()),
            Box::new(Cosine::default()),
            Box::new(ScaledLinear::default()),
            Box::new(Ve::new(80.0).unwrap()),
            Box::new(Flow::new(1.0).unwrap()),
            Box::new(Flow::new(3.0).unwrap()),
            Box::new(Flow::from_mu(0.8, "linear").unwrap()),
        ];
        for s in &scheds {
            for &t in &[0.05, 0.3, 0.7, 0.95] {
                let a = s.alpha_series(t, 3);
                let g = s.sigma_series(t, 3);
                let l = s.lambda_series(t, 3);
                for k in 1..=3 {
                    let h = (1e-2 * t).min(1e-2 * (1.0 - t)).min(2e-3);
                    let tol = 1e-3 * (1.0 + a.derivative(k).abs());
                    assert!(
                        (a.derivative(k) - fd(&|x| s.alpha(x), t, h, k)).abs() < tol,
                        "{} alpha d{k} t={t}",
                        s.name()
                    );
                    let tol = 1e-3 * (1.0 + g.derivative(k).abs());
                    assert!(
                        (g.derivative(k) - fd(&|x| s.sigma(x), t, h, k)).abs() < tol,
                        "{} sigma d{k} t={t}",
                        s.name()
                    );
                    let tol = 1e-3 * (1.0 + l.derivative(k).abs());
                    assert!(
                        (l.derivative(k) - fd(&|x| s.lambda(x), t, h, k)).abs() < tol,
                        "{} lambda d{k} t={t}",
                        s.name()
                    );
                }
            }
        }
    }

    #[test]
    fn flow_is_the_path_one_minus_sigma_x0_plus_sigma_eps_scaled_to_vp() {
        // ς(u) = s u/(1 + (s − 1) u); the model state c(α x0 + σ ε) = (1 − ς) x0 + ς ε.
        for shift in [1.0, 3.0, 0.5] {
            let f = Flow::new(shift).unwrap();
            for u in [1e-4, 0.1, 0.5, 0.9, 0.999] {
                let g = shift * u / (1.0 + (shift - 1.0) * u);
                let (a, s, c) = (f.alpha(u), f.sigma(u), f.state_scale(u));
                assert!((a * a + s * s - 1.0).abs() < 1e-15);
                assert!((c * a - (1.0 - g)).abs() < 1e-15 && (c * s - g).abs() < 1e-15);
                assert!((f.lambda(u) - ((1.0 - g) / g).ln()).abs() < 1e-12);
                assert!((f.alpha_bar(u) - a * a).abs() < 1e-14);
                let (sa, ss) = f.state_series(u, 2);
                assert!((sa.value() - (1.0 - g)).abs() < 1e-15 && (ss.value() - g).abs() < 1e-15);
                // network time 1000 ς and back; λ and back
                assert!((f.network_time(u) - 1000.0 * g).abs() < 1e-9);
                let back = f.time_of_network_time(f.network_time(u)).unwrap();
                assert!((back - u).abs() < 1e-12, "{shift} {u}: {back}");
                assert!((f.t_of_lambda(f.lambda(u)).unwrap() - u).abs() < 1e-12);
            }
            // pure noise at u = 1: ᾱ = 0, λ = −∞, and α, σ analytic there
            assert_eq!(f.alpha(1.0), 0.0);
            assert_eq!(f.sigma(1.0), 1.0);
            assert_eq!(f.lambda(1.0), f64::NEG_INFINITY);
            let a = f.alpha_series(1.0, 3);
            assert!(a.0.iter().all(|c| c.is_finite()), "{a:?}");
            let h = 1e-4;
            let fd1 = (f.alpha(1.0) - f.alpha(1.0 - h)) / h;
            assert!((a.derivative(1) - fd1).abs() < 1e-3 * (1.0 + fd1.abs()));
        }
        // diffusers' dynamic shifts: exponential is s = e^μ, linear is s = μ
        let u = 0.37;
        let mu: f64 = 1.15;
        let e = Flow::from_mu(mu, "exponential").unwrap();
        let want = mu.exp() / (mu.exp() + (1.0 / u - 1.0));
        assert!((e.flow_sigma(u) - want).abs() < 1e-15);
        let l = Flow::from_mu(mu, "linear").unwrap();
        assert!((l.flow_sigma(u) - mu / (mu + (1.0 / u - 1.0))).abs() < 1e-15);
    }

    #[test]
    fn flow_refuses_a_shift_that_is_not_positive_naming_the_key() {
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let e = Flow::new(bad).unwrap_err().to_string();
            assert!(e.contains("shift") && e.contains("positive"), "{e}");
        }
        let e = Flow::from_mu(-0.5, "linear").unwrap_err().to_string();
        assert!(e.contains("mu") && e.contains("-0.5"), "{e}");
        let e = Flow::from_mu(0.5, "cubic").unwrap_err().to_string();
        assert!(e.contains("time_shift") && e.contains("cubic"), "{e}");
        let e = Flow::new(3.0)
            .unwrap()
            .time_of_network_time(1000.5)
            .unwrap_err()
            .to_string();
        assert!(e.contains("1000.5"), "{e}");
    }

    #[test]
    fn discrete_alphas_cumprod_match_diffusers_float32_values() {
        // Reference values printed by diffusers 0.42.1 (alphas_cumprod at 0, 1, 499, 998, 999).
        let lin = Tabulated::diffusers("linear", 1e-4, 0.02, 1000).unwrap();
        let sd = Tabulated::diffusers("scaled_linear", 0.00085, 0.012, 1000).unwrap();
        let want_lin = [
            0.999899983,
            0.999780059,
            0.078587234,
            4.11819419e-05,
            4.03583035e-05,
        ];
        let want_sd = [
            0.999149978,
            0.998296022,
            0.27766943,
            0.00471669575,
            0.00466009509,
        ];
        for (k, &n) in [0usize, 1, 499, 998, 999].iter().enumerate() {
            let t = (n + 1) as f64 / 1000.0;
            assert!(
                (lin.alpha_bar(t) / want_lin[k] - 1.0).abs() < 2e-8,
                "linear {n}: {}",
                lin.alpha_bar(t)
            );
            assert!(
                (sd.alpha_bar(t) / want_sd[k] - 1.0).abs() < 2e-8,
                "sd {n}: {}",
                sd.alpha_bar(t)
            );
        }
        assert!(Tabulated::diffusers("quadratic", 1e-4, 0.02, 1000).is_err());
        // σ = 0 at t = 0, where the spline passes through ln ᾱ = 0.
        assert_eq!(lin.sigma(0.0), 0.0);
    }

    #[test]
    fn closed_form_scalars_agree_with_the_series() {
        let betas: Vec<f64> = (0..100).map(|i| 1e-3 + 1e-3 * i as f64).collect();
        let scheds: Vec<Box<dyn Schedule>> = vec![
            Box::new(VpLinear::default()),
            Box::new(Cosine::default()),
            Box::new(ScaledLinear::default()),
            Box::new(Tabulated::from_betas("t", &betas).unwrap()),
            Box::new(Flow::new(3.0).unwrap()),
        ];
        for s in &scheds {
            for &t in &[0.003, 0.2, 0.55, 0.9] {
                let series = s.log_alpha_bar_series(t, 1);
                let (l, dl) = s.log_alpha_bar_and_slope(t);
                assert!(
                    (l - series.0[0]).abs() < 1e-13 * (1.0 + l.abs()),
                    "{}",
                    s.name()
                );
                assert!(
                    (dl - series.0[1]).abs() < 1e-12 * (1.0 + dl.abs()),
                    "{}",
                    s.name()
                );
            }
        }
    }

    #[test]
    fn vp_linear_derivatives_match_design_closed_forms() {
        // α' = −½βα, σ' = βα²/(2σ) (DESIGN §2).
        let s = VpLinear::default();
        for &t in &[0.01, 0.2, 0.5, 1.0] {
            let (a, g, b) = (s.alpha(t), s.sigma(t), s.beta(t));
            assert!((s.alpha_series(t, 1).0[1] - (-0.5 * b * a)).abs() < 1e-12);
            assert!((s.sigma_series(t, 1).0[1] - b * a * a / (2.0 * g)).abs() < 1e-10);
            assert!((a * a + g * g - 1.0).abs() < 1e-14);
        }
    }

    #[test]
    fn lambda_inversion_round_trips() {
        let scheds: Vec<Box<dyn Schedule>> = vec![
            Box::new(VpLinear::default()),
            Box::new(Cosine::default()),
            Box::new(ScaledLinear::default()),
        ];
        for s in &scheds {
            for &t in &[1e-3, 0.01, 0.3, 0.9] {
                let back = s.t_of_lambda(s.lambda(t)).unwrap();
                assert!(
                    (back - t).abs() < 1e-12 * (1.0 + t) + 1e-14,
                    "{} t={t} back={back}",
                    s.name()
                );
            }
        }
        assert!(VpLinear::default().t_of_lambda(100.0).is_err());
    }

    #[test]
    fn tabulated_schedule_reproduces_its_table_and_approximates_the_continuous_limit() {
        let n = 1000;
        let betas: Vec<f64> = (0..n)
            .map(|i| 1e-4 + (0.02 - 1e-4) * i as f64 / (n - 1) as f64)
            .collect();
        let tab = Tabulated::from_betas("discrete", &betas).unwrap();
        let mut acc = 1.0;
        for (i, b) in betas.iter().enumerate() {
            acc *= 1.0 - b;
            let t = (i + 1) as f64 / n as f64;
            assert!((tab.alpha_bar(t) - acc).abs() < 1e-12 * acc.max(1e-300) + 1e-15);
        }
        // The continuous linear-β schedule is its limit: ln α differs by O(1/N)
        // (Σβ_i vs ∫β, and ln(1 − β) vs −β, each about 1/N relative).
        let c = VpLinear::default();
        for &t in &[0.1, 0.5, 0.9] {
            let rel = (tab.alpha(t) / c.alpha(t)).ln().abs();
            assert!(
                rel < 2.0 * c.beta(t).max(1.0) * t * t / n as f64 * 10.0,
                "t={t}: {rel}"
            );
        }
        assert!(Tabulated::from_alpha_bars("x", &[0.9, 0.95]).is_err());
        assert!(Tabulated::from_betas("x", &[0.5, 1.5]).is_err());
    }
}
