//! Sharded evaluation: one shard's per-sample features written as a part
//! ([`eval_shard`]), read back and checked ([`read_part_data`]), and merged into the results
//! the unsharded eval writes ([`merge_parts`]).

use super::*;

/// A `(rows, d)` f64 tensor of feature rows (all of length `d`).
pub(super) fn rows_tensor(rows: &[Vec<f64>]) -> Result<Tensor> {
    let d = rows.first().map_or(0, |r| r.len());
    let flat: Vec<f64> = rows.iter().flatten().copied().collect();
    Ok(Tensor::from_vec(flat, (rows.len(), d), &Device::Cpu)?)
}

/// Runs shard `shard` of the evaluation `o` — samples ⌊I·n/N⌋..⌊(I+1)·n/N⌋ of every row,
/// the same training images of the `data:train` row, and test images ⌊I·T/N⌋..⌊(I+1)·T/N⌋
/// of the reference — and writes its part into the folder `o.out`: the per-sample results
/// as `part-I-of-N.safetensors`, then the manifest `part-I-of-N.json` with `config` (the
/// command line without `--shard`/`--out`) and its hash. Returns the manifest's path.
pub fn eval_shard(
    o: &EvalOptions,
    shard: Shard,
    config: Vec<String>,
    device: &Device,
) -> Result<PathBuf> {
    if o.max_seconds.is_some() {
        bail_option!(
            keys::SHARD,
            " takes no ",
            keys::MAX_SECONDS,
            ": every shard must draw every row (a shard out of time would leave rows merge cannot complete)"
        );
    }
    let (start, end) = shard.rows(o.n, keys::N)?;
    let Setup {
        m,
        c,
        test,
        runs,
        header,
    } = setup(o, device)?;
    let set = MetricSettings::of(o);
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let (ts0, ts1) = shard.range(test.n);
    let test_features = c.features_of_set(&subset(&test, ts0, ts1), ts1 - ts0)?;
    tensors.insert("test.features".into(), rows_tensor(&test_features)?);
    let t0 = Instant::now();
    let train = load_train(o)?;
    let (fake, conf, _) = set_features(&c, &train, start, end)?;
    let data_seconds = t0.elapsed().as_secs_f64();
    tensors.insert("data.features".into(), rows_tensor(&fake)?);
    tensors.insert(
        "data.confidence".into(),
        Tensor::new(conf.as_slice(), &Device::Cpu)?,
    );
    let mut cells = Vec::with_capacity(runs.len());
    for (k, p) in runs.iter().enumerate() {
        let t0 = Instant::now();
        let plan = p.cell_plan(o.grid_nfe);
        match draw(o, &m, &c, p, start, end, set.grid_images, device) {
            Ok(d) => {
                let seconds = t0.elapsed().as_secs_f64();
                tensors.insert(format!("cell{k}.features"), rows_tensor(&d.features)?);
                tensors.insert(
                    format!("cell{k}.confidence"),
                    Tensor::new(d.confidence.as_slice(), &Device::Cpu)?,
                );
                tensors.insert(
                    format!("cell{k}.top"),
                    Tensor::new(d.top.as_slice(), &Device::Cpu)?,
                );
                if let (Some(_), Some(first)) = (&plan.png, d.first) {
                    tensors.insert(format!("cell{k}.first"), first);
                }
                eprintln!(
                    "eval: shard {}/{}: {:<18} samples {start}..{end} drawn ({seconds:.1} s)",
                    shard.index, shard.count, plan.sampler
                );
                cells.push(CellPart {
                    plan,
                    drawn: Some(CellDrawn {
                        row_evals: d.row_evals,
                        hits: d.hits,
                        seconds,
                    }),
                    skipped: None,
                });
            }
            Err(e) => {
                eprintln!("eval: {}, {} steps: skipped: {e:#}", p.sampler, p.steps);
                cells.push(CellPart {
                    plan,
                    drawn: None,
                    skipped: Some(format!("{e:#}")),
                });
            }
        }
    }
    let part = Part {
        config_hash: crate::shard::config_hash(&config),
        config,
        shard: shard.index,
        shards: shard.count,
        start,
        end,
        total: o.n,
        kind: EVAL_KIND.into(),
        item: vec![1, 28, 28],
        eval: Some(EvalPart {
            header,
            settings: set,
            test_start: ts0,
            test_end: ts1,
            test_total: test.n,
            data_seconds,
            cells,
        }),
    };
    crate::shard::create_parts_dir(&o.out)?;
    let data = o.out.join(format!("{}.safetensors", shard.stem()));
    crate::io::write_atomic_with(&data, |tmp| {
        Ok(candle_core::safetensors::save(&tensors, tmp)?)
    })?;
    crate::shard::write_manifest(&o.out, &part)
}

/// The per-sample results of one shard's row.
pub(super) struct CellData {
    pub(super) features: Vec<Vec<f64>>,
    pub(super) confidence: Vec<f64>,
    pub(super) first: Option<Tensor>,
}

/// The per-sample results of one eval part, checked against its manifest.
pub struct PartData {
    pub(super) test: Vec<Vec<f64>>,
    pub(super) data_features: Vec<Vec<f64>>,
    pub(super) data_confidence: Vec<f64>,
    /// Per row of the manifest; None for a skipped row.
    pub(super) cells: Vec<Option<CellData>>,
}

/// The eval section of the part whose manifest is `json` ([`Part::eval`], read as JSON).
pub(super) fn eval_section(json: &Path, part: &Part) -> Result<EvalPart> {
    let section = part.eval.clone().with_context(|| {
        format!(
            "{}: an eval part without its 'eval' section",
            json.display()
        )
    })?;
    serde_json::from_value(section)
        .with_context(|| format!("{}: its 'eval' section is not eval's", json.display()))
}

/// Reads the per-sample results of the eval part whose manifest is `json` (its
/// `part-I-of-N.safetensors`) and checks every array's presence, type and shape against the
/// manifest; errors name the file and the array.
pub fn read_part_data(json: &Path, part: &Part) -> Result<PartData> {
    let info = &eval_section(json, part)?;
    if (info.test_start, info.test_end) != part.shard().range(info.test_total) {
        bail!(
            "{}: test images {}..{} of {} are not shard {}/{}'s",
            json.display(),
            info.test_start,
            info.test_end,
            info.test_total,
            part.shard,
            part.shards
        );
    }
    let path = part.data_path(json);
    if !path.is_file() {
        bail!(
            "{}: no such file (the per-sample results of {})",
            path.display(),
            json.display()
        );
    }
    let t = candle_core::safetensors::load(&path, &Device::Cpu)
        .with_context(|| format!("{}: not a safetensors file of eval results", path.display()))?;
    let get = |name: &str, shape: &[usize], dtype: DType| -> Result<Tensor> {
        let x = t
            .get(name)
            .with_context(|| format!("{}: no array '{name}'", path.display()))?;
        if x.dims() != shape || x.dtype() != dtype {
            bail!(
                "{}: array '{name}' is {:?} {:?}, expected {dtype:?} {shape:?}",
                path.display(),
                x.dtype(),
                x.dims()
            );
        }
        Ok(x.clone())
    };
    let dim = t
        .get("test.features")
        .and_then(|x| x.dims().get(1).copied())
        .with_context(|| format!("{}: no 2-d array 'test.features'", path.display()))?;
    let rows = part.end - part.start;
    let test = get(
        "test.features",
        &[info.test_end - info.test_start, dim],
        DType::F64,
    )?
    .to_vec2::<f64>()?;
    let data_features = get("data.features", &[rows, dim], DType::F64)?.to_vec2::<f64>()?;
    let data_confidence = get("data.confidence", &[rows], DType::F64)?.to_vec1::<f64>()?;
    let g = info.settings.grid_images;
    let first_rows = g.min(part.end).saturating_sub(part.start);
    let mut cells = Vec::with_capacity(info.cells.len());
    for (k, cell) in info.cells.iter().enumerate() {
        if cell.drawn.is_none() {
            cells.push(None);
            continue;
        }
        let features =
            get(&format!("cell{k}.features"), &[rows, dim], DType::F64)?.to_vec2::<f64>()?;
        let confidence =
            get(&format!("cell{k}.confidence"), &[rows], DType::F64)?.to_vec1::<f64>()?;
        get(&format!("cell{k}.top"), &[rows], DType::U32)?;
        let first = match (&cell.plan.png, first_rows) {
            (Some(_), r) if r > 0 => {
                let mut shape = vec![r];
                shape.extend(&part.item);
                Some(get(&format!("cell{k}.first"), &shape, DType::F32)?)
            }
            _ => None,
        };
        cells.push(Some(CellData {
            features,
            confidence,
            first,
        }));
    }
    Ok(PartData {
        test,
        data_features,
        data_confidence,
        cells,
    })
}

/// Merges the eval parts `parts` — one run's, shards 0..N once each, in shard order, as
/// [`crate::shard::read_parts`] returns them — into the results folder `out`: every row's
/// metrics are computed from the merged per-sample features (not from per-shard scores), so
/// `results.json`, `results.csv`, `report.md`, `fid_vs_nfe.png` and the grid PNGs hold the
/// numbers the unsharded run writes. Only `seconds` differs: a merged row's seconds are the
/// shards' sampling-and-feature seconds added up, plus merge's metric time (compute spent,
/// not wall clock). A row some shard skipped is dropped. Writes nothing on an error.
pub fn merge_parts(parts: &[(PathBuf, Part)], out: &Path) -> Result<Report> {
    let (first_path, first) = parts.first().context("merge: no parts")?;
    if first.kind != EVAL_KIND {
        bail!(
            "merge: {} is a part of `sample` (its output is .{}), not of `eval`",
            first_path.display(),
            first.kind
        );
    }
    let section = |p: &Path, part: &Part| eval_section(p, part).context("merge");
    let info0 = section(first_path, first)?;
    let plans = |i: &EvalPart| i.cells.iter().map(|c| c.plan.clone()).collect::<Vec<_>>();
    let mut infos = Vec::with_capacity(parts.len());
    let mut data = Vec::with_capacity(parts.len());
    for (p, part) in parts {
        let info = section(p, part)?;
        if info.header != info0.header
            || info.settings != info0.settings
            || info.test_total != info0.test_total
            || plans(&info) != plans(&info0)
        {
            bail!(
                "merge: {} is of another run than {} (their classifier, data, settings or rows differ): merge the parts of one run",
                p.display(),
                first_path.display()
            );
        }
        data.push(read_part_data(p, part).context("merge")?);
        infos.push(info);
    }
    let set = &info0.settings;
    let test: Vec<Vec<f64>> = data.iter().flat_map(|d| d.test.clone()).collect();
    let reference = Reference::new(test, set.n)?;
    let mut report = info0.header.clone();
    let fake: Vec<Vec<f64>> = data.iter().flat_map(|d| d.data_features.clone()).collect();
    let conf: Vec<f64> = data
        .iter()
        .flat_map(|d| d.data_confidence.clone())
        .collect();
    let secs: f64 = infos.iter().map(|i| i.data_seconds).sum();
    report
        .rows
        .push(data_row(set, &reference, &fake, &conf, secs)?);
    let mut pngs: Vec<(String, Tensor)> = Vec::new();
    for (k, plan) in plans(&info0).iter().enumerate() {
        if let Some((p, why)) = parts.iter().zip(&infos).find_map(|((_, part), i)| {
            i.cells[k]
                .drawn
                .is_none()
                .then(|| (part.shard(), i.cells[k].skipped.clone().unwrap_or_default()))
        }) {
            eprintln!(
                "eval: {}, {} steps: skipped (in shard {}/{}: {why})",
                plan.sampler, plan.steps, p.index, p.count
            );
            continue;
        }
        let cells: Vec<&CellData> = data
            .iter()
            .map(|d| d.cells[k].as_ref().expect("drawn in every shard"))
            .collect();
        let drawn: Vec<&CellDrawn> = infos
            .iter()
            .map(|i| i.cells[k].drawn.as_ref().expect("drawn in every shard"))
            .collect();
        let fake: Vec<Vec<f64>> = cells.iter().flat_map(|c| c.features.clone()).collect();
        let conf: Vec<f64> = cells.iter().flat_map(|c| c.confidence.clone()).collect();
        let row_evals = drawn.iter().map(|d| d.row_evals).sum();
        let hits = drawn
            .iter()
            .try_fold(0usize, |acc, d| d.hits.map(|h| acc + h));
        let secs: f64 = drawn.iter().map(|d| d.seconds).sum();
        let row = row_of(set, &reference, plan, &fake, &conf, row_evals, hits, secs)?;
        print_row(&row, secs);
        if let Some(name) = &plan.png {
            let firsts: Vec<Tensor> = cells.iter().filter_map(|c| c.first.clone()).collect();
            if !firsts.is_empty() {
                pngs.push((name.clone(), Tensor::cat(&firsts, 0)?));
            }
        }
        report.rows.push(row);
    }
    std::fs::create_dir_all(out).map_err(|e| {
        option_error!(
            (keys::OUT, out.display().to_string()),
            ": cannot create the folder"
        )
        .caused_by(e.into())
    })?;
    for (name, images) in &pngs {
        crate::io::write_png_grid(&out.join(name), images)?;
    }
    write_report(out, &report)?;
    Ok(report)
}

/// Reads the eval parts under the folders `dirs` ([`crate::shard::read_parts`]) and merges
/// them into the results folder `out` ([`merge_parts`]).
pub fn merge(dirs: &[PathBuf], out: &Path) -> Result<Report> {
    merge_parts(&crate::shard::read_parts(dirs)?, out)
}
