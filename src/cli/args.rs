//! The flags `sample`, `bench` and `tune` share, parsed into the library's run settings
//! ([`qtaylor::sampling::spec::RunSettings`]): no flag has a default here (the library's
//! builders own them), so a setting is what the user gave.

use clap::Args;

use qtaylor::config::{GridSettings, SamplerSettings, ScheduleSettings, parse_numbers};
use qtaylor::keys;
use qtaylor::sampling::spec::RunSettings;

/// Options shared by `sample`, `bench` and `tune`.
#[derive(Args)]
pub struct Common {
    /// gmm-demo (bench's default), a mixture FILE.json, or empirical:PATH[:N] (PATH: a .npy
    /// (N, d) array, an IDX file, a folder of MNIST IDX files, or mnist for data/mnist).
    /// `sample` without --problem and --model uses the embedded MNIST model
    #[arg(long)]
    pub problem: Option<String>,
    /// vp-linear | cosine | scaled-linear | discrete | flow (rectified flow, SD3/Flux: x =
    /// (1 − ς) x0 + ς ε, t the unshifted time) | ve (x = x0 + t ε, EDM) [default: vp-linear]
    #[arg(long)]
    pub schedule: Option<String>,
    /// Flow schedule: time shift s, ς = s t/(1 + (s − 1) t) (diffusers' shift) [default: 1]
    #[arg(long, allow_negative_numbers = true)]
    pub shift: Option<f64>,
    /// Flow schedule: dynamic shift μ (diffusers' mu), instead of --shift
    #[arg(long, allow_negative_numbers = true)]
    pub mu: Option<f64>,
    /// Flow schedule: how --mu shifts, exponential (s = e^μ) | linear (s = μ)
    /// [default: exponential]
    #[arg(long)]
    pub time_shift: Option<String>,
    /// β_min of the vp-linear schedule [default: 0.1]
    #[arg(long)]
    pub beta_min: Option<f64>,
    /// β_max of the vp-linear schedule [default: 20]
    #[arg(long)]
    pub beta_max: Option<f64>,
    /// Discrete schedule: diffusers beta_schedule (linear | scaled_linear | squaredcos_cap_v2)
    /// [default: linear]
    #[arg(long)]
    pub beta_schedule: Option<String>,
    /// Discrete schedule: first beta [default: 0.0001]
    #[arg(long)]
    pub beta_start: Option<f64>,
    /// Discrete schedule: last beta [default: 0.02]
    #[arg(long)]
    pub beta_end: Option<f64>,
    /// Discrete schedule: number of trained steps T (step n sits at t = (n + 1)/T)
    /// [default: 1000]
    #[arg(long)]
    pub train_steps: Option<usize>,
    /// uniform | quadratic | logsnr | karras [default: uniform; a discrete schedule takes
    /// --spacing unless --grid is given, and then fractional timesteps (diffusers'
    /// use_karras_sigmas)]
    #[arg(long)]
    pub grid: Option<String>,
    /// --grid karras: the exponent ρ [default: 7]
    #[arg(long)]
    pub rho: Option<f64>,
    /// --grid: the smallest σ/α (diffusers' sigma_min), instead of --t-min [default: the
    /// first trained step on a discrete schedule]
    #[arg(long)]
    pub sigma_min: Option<f64>,
    /// --grid: the largest σ/α (diffusers' sigma_max), instead of --t-max
    #[arg(long)]
    pub sigma_max: Option<f64>,
    /// Discrete schedule: diffusers timestep spacing leading | trailing | linspace (DDIM's: N
    /// points), or leading-multistep | linspace-multistep (DPM-Solver multistep, UniPC and
    /// DEIS: N + 1 points, the last dropped) [default: the checkpoint's timestep_spacing, else
    /// leading]
    #[arg(long)]
    pub spacing: Option<String>,
    /// Discrete schedule: steps_offset added by the leading spacing [default: the
    /// checkpoint's, else 0]
    #[arg(long)]
    pub steps_offset: Option<usize>,
    /// Discrete and flow schedules: end at zero (ᾱ = 1, returns x̂0) or at the last trained
    /// step (flow: at --t-min) [default: zero]
    #[arg(long)]
    pub r#final: Option<String>,
    /// Continuous grids: final time [default: 1e-3; a discrete schedule: its first trained
    /// step 1/T]
    #[arg(long, allow_negative_numbers = true)]
    pub t_min: Option<f64>,
    /// Continuous grids: start time [default: 1, or the schedule's end (cosine: 0.9946)]
    #[arg(long, allow_negative_numbers = true)]
    pub t_max: Option<f64>,
    /// Stochasticity η >= 0: DDIM (default 0), dpmpp-2m-sde (default 1)
    #[arg(long, allow_negative_numbers = true)]
    pub eta: Option<f64>,
    /// Seed: sample i draws its noise from stream (seed, i) [default: 0]
    #[arg(long)]
    pub seed: Option<u64>,
    /// Expansion variable of the quasi-Taylor samplers: t | abar | logsnr | state (the
    /// model's own state in t: the flow or VE state) [default: t]
    #[arg(long)]
    pub expand: Option<String>,
    /// Final step of the quasi-Taylor samplers: ddim (K → ∞ limit) | taylor [default: ddim]
    #[arg(long)]
    pub qt_last: Option<String>,
    /// DDPM variance: beta-tilde (posterior) | beta [default: the checkpoint's variance_type,
    /// else beta-tilde]
    #[arg(long)]
    pub ddpm_variance: Option<String>,
    /// Relative tolerance of the adaptive samplers [rk45: 1e-5; dpm-solver-12/23: 0.05]
    #[arg(long)]
    pub rtol: Option<f64>,
    /// Absolute tolerance of the adaptive samplers [rk45: 1e-5; dpm-solver-12/23: 0.0078]
    #[arg(long)]
    pub atol: Option<f64>,
    /// Multistep samplers use lower orders over the last steps (below 15 steps; UniPC always)
    #[arg(long)]
    pub lower_order_final: bool,
    /// UniPC's B(h): bh1 | bh2 [default: bh2]
    #[arg(long)]
    pub unipc_variant: Option<String>,
    /// Turn UniPC's corrector (UniC) off
    #[arg(long)]
    pub no_corrector: bool,
    /// EDM: stochastic churn S_churn (0: deterministic Heun) [default: 0]
    #[arg(long, allow_negative_numbers = true)]
    pub s_churn: Option<f64>,
    /// EDM: churn only where σ/α >= S_tmin [default: 0]
    #[arg(long, allow_negative_numbers = true)]
    pub s_tmin: Option<f64>,
    /// EDM: churn only where σ/α <= S_tmax [default: inf]
    #[arg(long, allow_negative_numbers = true)]
    pub s_tmax: Option<f64>,
    /// EDM: noise scale S_noise of the churn [default: 1]
    #[arg(long, allow_negative_numbers = true)]
    pub s_noise: Option<f64>,
    /// Add one NFE at the end that returns x̂0 at the last time
    #[arg(long)]
    pub denoise_final: bool,
    /// cpu, cuda or cuda:N (GPU N; CUDA needs a binary built with --features cuda)
    /// [default: cpu]
    #[arg(long)]
    pub device: Option<String>,
}

/// `true` as `Some(true)`, else unset.
fn switch(on: bool) -> Option<bool> {
    on.then_some(true)
}

impl Common {
    /// The run settings these flags give (the command adds its own).
    pub fn settings(&self) -> RunSettings {
        RunSettings {
            problem: self.problem.clone(),
            schedule: ScheduleSettings {
                schedule: self.schedule.clone(),
                beta_min: self.beta_min,
                beta_max: self.beta_max,
                beta_schedule: self.beta_schedule.clone(),
                beta_start: self.beta_start,
                beta_end: self.beta_end,
                train_steps: self.train_steps,
                shift: self.shift,
                mu: self.mu,
                time_shift: self.time_shift.clone(),
                ve_sigma_max: self.sigma_max.or(self.t_max),
            },
            grid: GridSettings {
                grid: self.grid.clone(),
                rho: self.rho,
                t_min: self.t_min,
                t_max: self.t_max,
                sigma_min: self.sigma_min,
                sigma_max: self.sigma_max,
                spacing: self.spacing.clone(),
                steps_offset: self.steps_offset,
                final_: self.r#final.clone(),
                ..GridSettings::default()
            },
            options: SamplerSettings {
                eta: self.eta,
                expand: self.expand.clone(),
                qt_last: self.qt_last.clone(),
                ddpm_variance: self.ddpm_variance.clone(),
                rtol: self.rtol,
                atol: self.atol,
                lower_order_final: switch(self.lower_order_final),
                unipc_variant: self.unipc_variant.clone(),
                unipc_corrector: self.no_corrector.then_some(false),
                s_churn: self.s_churn,
                s_tmin: self.s_tmin,
                s_tmax: self.s_tmax,
                s_noise: self.s_noise,
                denoise_final: switch(self.denoise_final),
            },
            seed: self.seed,
            device: self.device.clone(),
            ..RunSettings::default()
        }
    }

    /// The device to run on.
    pub fn device(&self) -> anyhow::Result<candle_core::Device> {
        qtaylor::gpu::device::by_name(self.device.as_deref().unwrap_or("cpu"))
    }
}

/// `--timesteps` or `--sigmas` as numbers.
pub fn numbers(key: keys::Key, list: Option<&str>) -> anyhow::Result<Option<Vec<f64>>> {
    list.map(|l| parse_numbers(key, l)).transpose()
}

/// The command line after the program name (a shard's configuration is made from it).
pub fn command_line() -> Vec<String> {
    std::env::args().skip(1).collect()
}
