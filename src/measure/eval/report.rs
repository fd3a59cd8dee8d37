//! An evaluation's report: CSV, Markdown, the FID-vs-NFE plot and the results folder.

use super::*;

pub(super) fn default_grid_name() -> String {
    "default".into()
}

/// The sampler with its grid when it is not the default.
pub(super) fn name_of(r: &Row) -> String {
    if r.grid == "default" {
        r.sampler.clone()
    } else {
        format!("{} [{}]", r.sampler, r.grid)
    }
}

pub(super) fn label(r: &Row) -> String {
    match (r.nfe_budget, r.tolerance) {
        (_, Some(t)) => format!("{} (tol {t:.0e})", r.sampler),
        (None, None) if r.sampler == "ddpm" => format!("ddpm ({} steps, reference)", r.steps),
        (None, None) => format!(
            "{} (n real training images; the classifier was trained on them)",
            r.sampler
        ),
        _ => name_of(r),
    }
}

/// CSV text of the rows.
pub fn csv(report: &Report) -> String {
    let mut s = String::from(
        "sampler,grid,nfe_budget,tolerance,steps,nfe,n,fid_mnist_features,kid,kid_std,precision,recall,confidence,seconds,conditional_accuracy,confident\n",
    );
    for r in &report.rows {
        s += &format!(
            "{},{},{},{},{},{:.2},{},{:.6},{:.6e},{:.3e},{:.4},{:.4},{:.4},{:.2},{},{}\n",
            r.sampler,
            r.grid,
            r.nfe_budget.map_or(String::new(), |b| b.to_string()),
            r.tolerance.map_or(String::new(), |t| format!("{t:e}")),
            r.steps,
            r.nfe,
            r.n,
            r.fid,
            r.kid,
            r.kid_std,
            r.precision,
            r.recall,
            r.confidence,
            r.seconds,
            r.conditional_accuracy
                .map_or(String::new(), |a| format!("{a:.4}")),
            r.confident.map_or(String::new(), |f| format!("{f:.4}"))
        );
    }
    s
}

/// Markdown report: the FID table (samplers × NFE budgets) and the full rows.
pub fn markdown(report: &Report) -> String {
    let mut s = format!(
        "# Sample quality vs NFE\n\n**{}**: Fréchet distance between Gaussians fitted to the \
         128-d penultimate features of the project's MNIST classifier ({}, test accuracy {:.2} %), \
         samples vs the {}. Model `{}`, seed {}, device {}.\n\n",
        report.metric,
        report.classifier,
        100.0 * report.classifier_test_accuracy,
        report.reference,
        report.model,
        report.seed,
        report.device
    );
    // Pivot: rows = samplers with budgets, columns = budgets.
    let mut budgets: Vec<usize> = report.rows.iter().filter_map(|r| r.nfe_budget).collect();
    budgets.sort_unstable();
    budgets.dedup();
    let mut names: Vec<String> = Vec::new();
    for r in report.rows.iter().filter(|r| r.nfe_budget.is_some()) {
        if !names.contains(&name_of(r)) {
            names.push(name_of(r));
        }
    }
    if !names.is_empty() {
        s += &format!("## {} by NFE\n\n| sampler |", report.metric);
        for b in &budgets {
            s += &format!(" {b} |");
        }
        s += "\n|---|";
        s += &"---:|".repeat(budgets.len());
        s += "\n";
        for name in &names {
            s += &format!("| {name} |");
            for b in &budgets {
                match report
                    .rows
                    .iter()
                    .find(|r| &name_of(r) == name && r.nfe_budget == Some(*b))
                {
                    Some(r) => s += &format!(" {:.3} |", r.fid),
                    None => s += " – |",
                }
            }
            s += "\n";
        }
        s += "\n";
    }
    let cond = report.guidance.is_some();
    if let Some(w) = report.guidance {
        s += &format!(
            "Class-conditional model, classifier-free guidance w = {w}: sample i asks for class i mod (classes); \
             conditional accuracy is the fraction of samples the classifier assigns to the class asked for. \
             NFE counts guided calls (2 network rows per sample when w is not 0 or 1).\n\n"
        );
    }
    s += "## All rows\n\n| run | steps | NFE | FID (MNIST features) | KID | precision | recall | confidence | confident | n | seconds |";
    s += if cond {
        " conditional accuracy |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    } else {
        "\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    };
    for r in &report.rows {
        s += &format!(
            "| {} | {} | {:.1} | {:.3} | {:.2e} ± {:.1e} | {:.3} | {:.3} | {:.3} | {} | {} | {:.1} |",
            label(r),
            r.steps,
            r.nfe,
            r.fid,
            r.kid,
            r.kid_std,
            r.precision,
            r.recall,
            r.confidence,
            r.confident.map_or("–".into(), |f| format!("{f:.3}")),
            r.n,
            r.seconds
        );
        if cond {
            s += &r
                .conditional_accuracy
                .map_or(" – |".to_string(), |a| format!(" {a:.3} |"));
        }
        s += "\n";
    }
    s += "\nKID: unbiased MMD² with the cubic kernel, mean ± std over random subsets. \
          Precision/recall: k = 3 nearest neighbours (Kynkäänniemi et al. 2019) against the \
          first n test images. Confidence: the classifier's mean top-1 probability; confident: \
          the fraction of samples whose top-1 probability is above 0.9. Samples are quantised \
          to 8 bits before the features are taken.\n";
    s
}

/// Re-renders `results.csv`, `report.md` and `fid_vs_nfe.png` of `dir` from its
/// `results.json` (after merging or editing rows of several runs).
pub fn render(dir: &Path) -> Result<Report> {
    let file = dir.join("results.json");
    let text = std::fs::read_to_string(&file)
        .with_context(|| format!("{}: cannot read the file", file.display()))?;
    let report: Report = serde_json::from_str(&text).with_context(|| {
        format!(
            "{}: not a results.json written by qtaylor eval",
            file.display()
        )
    })?;
    write_report(dir, &report)?;
    Ok(report)
}

pub(super) fn write_report(dir: &Path, report: &Report) -> Result<()> {
    use crate::io::write_atomic;
    write_atomic(&dir.join("results.csv"), csv(report).as_bytes())?;
    write_atomic(
        &dir.join("results.json"),
        serde_json::to_string_pretty(report)?.as_bytes(),
    )?;
    write_atomic(&dir.join("report.md"), markdown(report).as_bytes())?;
    let mut lines: Vec<Line> = Vec::new();
    for r in &report.rows {
        if r.sampler.starts_with("data:") || (r.sampler == "ddpm" && r.nfe_budget.is_none()) {
            continue;
        }
        let name = if r.tolerance.is_some() {
            format!("{} (tolerances)", r.sampler)
        } else {
            name_of(r)
        };
        match lines.iter_mut().find(|l| l.label == name) {
            Some(l) => l.points.push((r.nfe, r.fid)),
            None => lines.push(Line {
                label: name,
                points: vec![(r.nfe, r.fid)],
            }),
        }
    }
    for l in &mut lines {
        l.points.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    let floor = report
        .rows
        .iter()
        .find(|r| r.sampler == "data:train")
        .map(|r| (r.fid, format!("train images (n={})", r.n)));
    if !lines.is_empty() {
        loglog_png(
            &dir.join("fid_vs_nfe.png"),
            &[Panel {
                title: FID_LABEL.into(),
                y_label: "FID (MNIST features)".into(),
                lines,
                floor,
            }],
        )?;
    }
    Ok(())
}
