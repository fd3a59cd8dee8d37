//! `qtaylor tune`: its flags, parsed into [`qtaylor::tune::run::TuneSettings`].

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use qtaylor::tune::run::{TuneSettings, run as run_tune};

use super::args::Common;
use super::spelling::render_message;

#[derive(Args)]
pub struct TuneArgs {
    #[command(flatten)]
    pub common: Common,
    /// The sampler whose grid is tuned
    #[arg(long)]
    pub sampler: String,
    /// The NFE budget (the tuned grid has the steps that fit it)
    #[arg(long)]
    pub nfe: usize,
    /// The teacher SAMPLER:STEPS whose end points the tuned grid chases (a deterministic
    /// fixed-grid sampler; its steps are spread uniformly in log-SNR over the candidates)
    #[arg(long, default_value = "dpmpp-3m:100")]
    pub teacher: String,
    /// Tuning samples (noise streams no evaluation draws)
    #[arg(long, default_value_t = 256)]
    pub samples: usize,
    /// Held-out samples: they stop the refinement (--patience) and give the before/after
    /// check
    #[arg(long, default_value_t = 256)]
    pub holdout: usize,
    /// Candidate intervals of the fine grid (uniform in log-SNR)
    #[arg(long, default_value_t = 40)]
    pub candidates: usize,
    /// Sweeps of the global refinement after the dynamic program: a compass search that
    /// keeps a move of one time only when it lowers the whole sampler's --objective on the
    /// tuning samples (0: the dynamic program's grid as it is)
    #[arg(long, default_value_t = 30)]
    pub refine_sweeps: usize,
    /// What the refinement minimises: kid (the unbiased MMD² with KID's cubic kernel between
    /// the student's and the teacher's end points, as distributions, in a feature space: the
    /// MNIST classifier's for 28x28 images, the state for --problem) | fd (their Fréchet
    /// distance there) | l2 (the mean end-point distance to the teacher from the same noise)
    /// [default: fd where there is a feature space (--problem, 28x28 grey images), else l2,
    /// with a note]
    #[arg(long)]
    pub objective: Option<String>,
    /// The refinement stops after this many sweeps without a held-out improvement; the grid
    /// with the best held-out objective is written
    #[arg(long, default_value_t = 3)]
    pub patience: usize,
    /// --objective kid|fd on an image checkpoint: the feature classifier's folder
    /// [default: assets/classifier-mnist]
    #[arg(long)]
    pub classifier: Option<PathBuf>,
    /// A class-conditional --model: tune the guided sampler with these classes (sample i of
    /// each set asks for the i-th mod their number), comma-separated, or `all` (every class
    /// but the null one) [default: the unconditional model]
    #[arg(long)]
    pub classes: Option<String>,
    /// With --classes: the classifier-free guidance scale w [default: 1]
    #[arg(long)]
    pub guidance: Option<f64>,
    /// With --classes: the null class [default: the model's last]
    #[arg(long)]
    pub null_class: Option<u32>,
    /// f32 | f64: the state's dtype
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// A diffusers checkpoint folder [default without --problem: the embedded class-conditional
    /// MNIST model, whose unconditional (null-class) model is tuned]
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// --model: the network's dtype f32 | f16 | bf16
    #[arg(long, default_value = "f32")]
    pub model_dtype: String,
    /// Where to write the grid file (JSON)
    #[arg(long)]
    pub out: PathBuf,
    /// Data-parallel tuning, one replica per device (instead of --device), e.g.
    /// cuda:0,cuda:1: each holds its share of the --samples and --holdout samples, and every
    /// error is the mean over all of them; the grid is the one-device grid
    #[arg(long, conflicts_with = "device")]
    pub devices: Option<String>,
}

pub fn cmd(a: &TuneArgs) -> Result<()> {
    let mut run = a.common.settings();
    run.sampler = Some(a.sampler.clone());
    run.model = a.model.clone();
    run.model_dtype = Some(a.model_dtype.clone());
    run.dtype = Some(a.dtype.clone());
    run.guidance.classes = a.classes.clone();
    run.guidance.guidance = a.guidance;
    run.guidance.null_class = a.null_class;
    let settings = TuneSettings {
        run,
        nfe: a.nfe,
        teacher: a.teacher.clone(),
        samples: a.samples,
        holdout: a.holdout,
        candidates: a.candidates,
        refine_sweeps: a.refine_sweeps,
        objective: a.objective.clone(),
        patience: a.patience,
        classifier: a.classifier.clone(),
        out: a.out.clone(),
        devices: a.devices.clone(),
    };
    let mut log = qtaylor::io::progress::Log::new("tune");
    let lines = run_tune(&settings, &mut log, &mut |n| {
        eprintln!("{}", render_message(n))
    })?;
    for l in lines {
        println!("{l}");
    }
    Ok(())
}
