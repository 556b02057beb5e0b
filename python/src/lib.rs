//! memplan's Python bindings: the compiled `memplan._memplan` module behind the `memplan`
//! package.
//!
//! The library never learns about Python (`memplan` has no pyo3 dependency); this crate turns
//! Python values into the library's raw inputs and calls its public API. Keyword arguments
//! become a [`PlanArgs`], field for field the flags of `memplan estimate`, so that a plan
//! given as a path, an example name or a torchtitan TOML resolves through
//! [`PlanArgs::resolve`], the CLI's own path, with the CLI's error messages. What the CLI
//! cannot be given (a plan or a Hugging Face config as a Python dict, `host_ram` as an integer)
//! goes through [`load`], which repeats `PlanArgs::load` with the dict as the base layer; the
//! tests compare both against the installed `memplan` command. Results render through the
//! library's JSON renderer, so `Estimate.to_dict()` is the CLI's `--format json` document.

use std::ffi::OsString;
use std::path::PathBuf;

use memplan::cli::PlanArgs;
use memplan::error::{Error, Kind};
use memplan::estimate::Estimate as RustEstimate;
use memplan::output::{renderer, Format, MaxBatch, Row};
use memplan::plan::{self, Plan, PlanFile};
use memplan::profiles::{self, ModelConfig, ModelSpec};
use memplan::search::RankBy;
use memplan::torchtitan;
use pyo3::prelude::*;
use pyo3::sync::GILOnceCell;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple};

// ---------------------------------------------------------------------------------------------
// Errors

static PLAN_ERROR: GILOnceCell<Py<PyAny>> = GILOnceCell::new();
static JSON_LOADS: GILOnceCell<Py<PyAny>> = GILOnceCell::new();

fn kind_name(k: Kind) -> &'static str {
    match k {
        Kind::Input | Kind::Io => "input",
        Kind::Overflow => "overflow",
        Kind::Output => "output",
        Kind::Runtime => "runtime",
    }
}

/// A library error as `memplan.PlanError(message, field, kind)`.
fn plan_error(py: Python<'_>, e: Error) -> PyErr {
    let cls = match PLAN_ERROR.get_or_try_init(py, || {
        Ok::<_, PyErr>(py.import("memplan._errors")?.getattr("PlanError")?.unbind())
    }) {
        Ok(c) => c.bind(py),
        Err(err) => return err,
    };
    match cls.call1((e.to_string(), e.field(), kind_name(e.kind()))) {
        Ok(obj) => PyErr::from_value(obj),
        Err(err) => err,
    }
}

/// An input error about a Python argument, named as the keyword the caller wrote.
fn arg_error(field: &str, got: impl std::fmt::Display, accepted: &str) -> Error {
    Error::invalid(field, got, accepted)
}

fn json_loads<'py>(py: Python<'py>, text: &str) -> PyResult<Bound<'py, PyAny>> {
    let loads = JSON_LOADS.get_or_try_init(py, || {
        Ok::<_, PyErr>(py.import("json")?.getattr("loads")?.unbind())
    })?;
    loads.bind(py).call1((text,))
}

// ---------------------------------------------------------------------------------------------
// Python values into plan inputs

/// A Python value as JSON: dicts with string keys, lists, tuples, strings, booleans, integers,
/// finite floats and None.
fn to_json(field: &str, v: &Bound<'_, PyAny>, depth: usize) -> Result<serde_json::Value, Error> {
    use serde_json::Value;
    if depth > 64 {
        return Err(Error::input(format!(
            "{field}: nested deeper than 64 levels"
        )));
    }
    if v.is_none() {
        return Ok(Value::Null);
    }
    if let Ok(b) = v.downcast::<PyBool>() {
        return Ok(Value::Bool(b.is_true()));
    }
    if v.is_instance_of::<PyInt>() {
        if let Ok(i) = v.extract::<i64>() {
            return Ok(Value::from(i));
        }
        if let Ok(u) = v.extract::<u64>() {
            return Ok(Value::from(u));
        }
        // As serde_json reads an integer literal beyond 64 bits: a float.
        let f: f64 = v.extract().map_err(|_| {
            arg_error(
                field,
                "an integer beyond any float",
                "a JSON-representable value",
            )
        })?;
        return serde_json::Number::from_f64(f)
            .map(Value::Number)
            .ok_or_else(|| arg_error(field, "an integer beyond any float", "a finite number"));
    }
    if let Ok(f) = v.downcast::<PyFloat>() {
        let x = f.value();
        return serde_json::Number::from_f64(x)
            .map(Value::Number)
            .ok_or_else(|| arg_error(field, x, "a finite number"));
    }
    if let Ok(s) = v.downcast::<PyString>() {
        return Ok(Value::String(
            s.to_cow()
                .map_err(|_| arg_error(field, "a string that is not UTF-8", "UTF-8 text"))?
                .into_owned(),
        ));
    }
    if let Ok(d) = v.downcast::<PyDict>() {
        let mut map = serde_json::Map::with_capacity(d.len());
        for (k, item) in d.iter() {
            let key: String = k
                .extract()
                .map_err(|_| arg_error(field, format!("a key {}", repr(&k)), "string keys"))?;
            let sub = format!("{field}.{key}");
            map.insert(key, to_json(&sub, &item, depth + 1)?);
        }
        return Ok(Value::Object(map));
    }
    if v.is_instance_of::<PyList>() || v.is_instance_of::<PyTuple>() {
        let mut out = Vec::new();
        for item in v
            .try_iter()
            .map_err(|_| Error::input(format!("{field}: not iterable")))?
        {
            let item = item.map_err(|_| Error::input(format!("{field}: not iterable")))?;
            out.push(to_json(field, &item, depth + 1)?);
        }
        return Ok(Value::Array(out));
    }
    Err(arg_error(
        field,
        format!("a value of type {}", type_name(v)),
        "a JSON value (dict, list, str, int, float, bool or None)",
    ))
}

fn type_name(v: &Bound<'_, PyAny>) -> String {
    v.get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "?".into())
}

fn repr(v: &Bound<'_, PyAny>) -> String {
    v.repr()
        .map(|r| r.to_string())
        .unwrap_or_else(|_| "?".into())
}

/// Where the plan comes from, beyond the flags.
#[derive(Default)]
struct Source {
    /// Flags, and the plan path, example name or torchtitan TOML the CLI could be given.
    args: PlanArgs,
    /// A plan given as a Python dict.
    dict: Option<PlanFile>,
    /// A model given as a Hugging Face config dict.
    model: Option<ModelSpec>,
    /// `host_ram` given as an integer byte count (a plan file's integer form).
    host_ram_bytes: Option<serde_json::Value>,
}

/// The keyword arguments accepted as plan fields, as `memplan estimate` spells its flags.
const FIELDS: &[&str] = &[
    "plan",
    "example",
    "torchtitan",
    "model",
    "gpu",
    "num_gpus",
    "gpus_per_node",
    "host_ram",
    "dp_shard",
    "dp_replicate",
    "tp",
    "pp",
    "cp",
    "sp",
    "ep",
    "etp",
    "pp_schedule",
    "pp_virtual_stages",
    "ignore_max_position",
    "float8",
    "compile",
    "micro_batch_size",
    "seq_len",
    "grad_accum_steps",
    "param_dtype",
    "reduce_dtype",
    "master_dtype",
    "optimizer",
    "ac",
    "offload",
    "no_reshard_after_forward",
    "attention",
    "rmsnorm",
    "gqa",
    "logits",
    "optimizer_impl",
    "rotary",
    "fsdp_units",
    "loss_chunks",
    "qkv",
    "zero_grad",
    "fsdp_one_gpu",
    "preset",
];

fn int_arg(key: &str, v: &Bound<'_, PyAny>) -> Result<i64, Error> {
    if v.is_instance_of::<PyBool>() || !v.is_instance_of::<PyInt>() {
        return Err(arg_error(key, repr(v), "an integer"));
    }
    v.extract::<i64>()
        .map_err(|_| arg_error(key, repr(v), "an integer that fits 64 bits"))
}

fn str_arg(key: &str, v: &Bound<'_, PyAny>) -> Result<String, Error> {
    v.downcast::<PyString>()
        .ok()
        .and_then(|s| s.to_cow().ok().map(|c| c.into_owned()))
        .ok_or_else(|| arg_error(key, repr(v), "a string"))
}

fn bool_arg(key: &str, v: &Bound<'_, PyAny>) -> Result<bool, Error> {
    v.downcast::<PyBool>()
        .map(|b| b.is_true())
        .map_err(|_| arg_error(key, repr(v), "True or False"))
}

/// A str or os.PathLike as a path.
fn path_arg(key: &str, v: &Bound<'_, PyAny>) -> Result<PathBuf, Error> {
    v.extract::<PathBuf>()
        .map_err(|_| arg_error(key, repr(v), "a path (str or os.PathLike)"))
}

/// A str or os.PathLike as text (model and GPU names or paths).
fn name_or_path(key: &str, v: &Bound<'_, PyAny>) -> Result<String, Error> {
    if let Ok(s) = v.downcast::<PyString>() {
        return s
            .to_cow()
            .map(|c| c.into_owned())
            .map_err(|_| arg_error(key, "a string that is not UTF-8", "UTF-8 text"));
    }
    let p = path_arg(key, v)?;
    p.into_os_string()
        .into_string()
        .map_err(|_| arg_error(key, "a path that is not UTF-8", "a UTF-8 path"))
}

/// A Hugging Face config dict as a model: its `_name_or_path` (last component) names it.
fn model_from_dict(d: &Bound<'_, PyDict>) -> Result<ModelSpec, Error> {
    let value = to_json("model", d.as_any(), 0)?;
    let name = value
        .get("_name_or_path")
        .and_then(|v| v.as_str())
        .and_then(|s| s.trim_end_matches('/').rsplit('/').next())
        .filter(|s| !s.is_empty())
        .unwrap_or("custom")
        .to_string();
    let cfg: ModelConfig = serde_json::from_value(value)
        .map_err(|e| Error::input(format!("model config {name}: {e}")))?;
    cfg.into_spec(&name)
}

/// A plan given as a dict, read as the CLI reads a plan file's text.
fn plan_from_dict(d: &Bound<'_, PyDict>) -> Result<PlanFile, Error> {
    let value = to_json("plan", d.as_any(), 0)?;
    PlanFile::from_json(&value.to_string()).map_err(|e| e.context("plan"))
}

/// Keyword arguments (and the positional plan) into a [`Source`].
fn source(
    plan: Option<&Bound<'_, PyAny>>,
    fields: Option<&Bound<'_, PyDict>>,
) -> Result<Source, Error> {
    let mut s = Source::default();
    let a = &mut s.args;
    if let Some(p) = plan.filter(|p| !p.is_none()) {
        set_plan(&mut s.dict, &mut a.plan, p)?;
    }
    let Some(fields) = fields else {
        return Ok(s);
    };
    for (k, v) in fields.iter() {
        let key: String = k
            .extract()
            .map_err(|_| Error::input("keyword names are strings"))?;
        if v.is_none() {
            continue;
        }
        let key = key.as_str();
        let a = &mut s.args;
        match key {
            "plan" => {
                if s.dict.is_some() || a.plan.is_some() {
                    return Err(Error::input("plan given twice, positionally and as plan="));
                }
                set_plan(&mut s.dict, &mut a.plan, &v)?;
            }
            "example" => a.example = Some(str_arg(key, &v)?),
            "torchtitan" => a.torchtitan = Some(path_arg(key, &v)?),
            "model" => match v.downcast::<PyDict>() {
                Ok(d) => s.model = Some(model_from_dict(d)?),
                Err(_) => a.model = Some(name_or_path(key, &v)?),
            },
            "gpu" => a.gpu = Some(name_or_path(key, &v)?),
            "num_gpus" => a.num_gpus = Some(int_arg(key, &v)?),
            "gpus_per_node" => a.gpus_per_node = Some(int_arg(key, &v)?),
            "host_ram" => {
                if v.is_instance_of::<PyInt>() && !v.is_instance_of::<PyBool>() {
                    s.host_ram_bytes = Some(to_json(key, &v, 0)?);
                } else {
                    a.host_ram = Some(str_arg(key, &v).map_err(|_| {
                        arg_error(
                            key,
                            repr(&v),
                            "a size such as \"512GiB\" or an integer byte count",
                        )
                    })?);
                }
            }
            "dp_shard" => a.dp_shard = Some(int_arg(key, &v)?),
            "dp_replicate" => a.dp_replicate = Some(int_arg(key, &v)?),
            "tp" => a.tp = Some(int_arg(key, &v)?),
            "pp" => a.pp = Some(int_arg(key, &v)?),
            "cp" => a.cp = Some(int_arg(key, &v)?),
            "sp" => a.sp = Some(bool_arg(key, &v)?),
            "ep" => a.ep = Some(int_arg(key, &v)?),
            "etp" => a.etp = Some(int_arg(key, &v)?),
            "pp_schedule" => a.pp_schedule = Some(str_arg(key, &v)?),
            "pp_virtual_stages" => a.pp_virtual_stages = Some(int_arg(key, &v)?),
            "ignore_max_position" => a.ignore_max_position = bool_arg(key, &v)?,
            "float8" => a.float8 = bool_arg(key, &v)?,
            "compile" => a.compile = bool_arg(key, &v)?,
            "micro_batch_size" | "batch" => a.micro_batch_size = Some(int_arg(key, &v)?),
            "seq_len" => a.seq_len = Some(int_arg(key, &v)?),
            "grad_accum_steps" => a.grad_accum_steps = Some(int_arg(key, &v)?),
            "param_dtype" => a.param_dtype = Some(str_arg(key, &v)?),
            "reduce_dtype" => a.reduce_dtype = Some(str_arg(key, &v)?),
            "master_dtype" => a.master_dtype = Some(str_arg(key, &v)?),
            "optimizer" => a.optimizer = Some(str_arg(key, &v)?),
            "ac" => a.ac = Some(str_arg(key, &v)?),
            "offload" => a.offload = Some(str_arg(key, &v)?),
            "no_reshard_after_forward" => a.no_reshard_after_forward = bool_arg(key, &v)?,
            "attention" => a.attention = Some(str_arg(key, &v)?),
            "rmsnorm" => a.rmsnorm = Some(str_arg(key, &v)?),
            "gqa" => a.gqa = Some(str_arg(key, &v)?),
            "logits" => a.logits = Some(str_arg(key, &v)?),
            "optimizer_impl" => a.optimizer_impl = Some(str_arg(key, &v)?),
            "rotary" => a.rotary = Some(str_arg(key, &v)?),
            "fsdp_units" => a.fsdp_units = Some(str_arg(key, &v)?),
            "loss_chunks" => a.loss_chunks = Some(int_arg(key, &v)?),
            "qkv" => a.qkv = Some(str_arg(key, &v)?),
            "zero_grad" => a.zero_grad = Some(str_arg(key, &v)?),
            "fsdp_one_gpu" => a.fsdp_one_gpu = Some(bool_arg(key, &v)?),
            "preset" => a.preset = Some(str_arg(key, &v)?),
            _ => {
                return Err(Error::invalid(
                    key,
                    format!("{key:?}"),
                    format!("a plan keyword, one of {}", FIELDS.join(", ")),
                ))
            }
        }
    }
    // The CLI refuses these pairs (clap's `conflicts_with`).
    let a = &s.args;
    let plan_given = a.plan.is_some() || s.dict.is_some();
    if plan_given && a.example.is_some() {
        return Err(Error::input("plan and example cannot be given together"));
    }
    if a.torchtitan.is_some() && (plan_given || a.example.is_some()) {
        return Err(Error::input(
            "torchtitan cannot be given together with plan or example",
        ));
    }
    Ok(s)
}

fn set_plan(
    dict: &mut Option<PlanFile>,
    path: &mut Option<PathBuf>,
    p: &Bound<'_, PyAny>,
) -> Result<(), Error> {
    match p.downcast::<PyDict>() {
        Ok(d) => *dict = Some(plan_from_dict(d)?),
        Err(_) => {
            *path = Some(path_arg("plan", p).map_err(|_| {
                arg_error("plan", repr(p), "a plan dict or a path to a plan JSON file")
            })?)
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Resolution: the CLI's own, with a dict as the base layer

/// The plan file with the keywords laid over it, and the torchtitan job it came from
/// ([`PlanArgs::load_over`]); an integer `host_ram` goes on top, as the highest layer.
fn load(s: &Source) -> Result<(PlanFile, Option<torchtitan::Job>), Error> {
    let (mut file, job) = s.args.load_over(s.dict.clone())?;
    if let Some(v) = &s.host_ram_bytes {
        file.host_ram = Some(v.clone());
    }
    Ok((file, job))
}

/// The resolved plan, with the torchtitan reader's warnings first, as `memplan estimate`
/// resolves it.
fn resolve(s: &Source) -> Result<Plan, Error> {
    let (file, job) = load(s)?;
    s.args.resolve_file(file, job, s.model.clone())
}

/// The plan file a search starts from (the CLI's `PlanArgs::to_plan_file`), after resolving
/// it once so that every value is checked and named as the CLI names it.
fn search_base(s: &Source) -> Result<(Plan, PlanFile), Error> {
    let plan = resolve(s)?;
    if s.model.is_some() {
        return Err(Error::input(
            "search takes a model by profile name or config path, not a config dict",
        ));
    }
    Ok((plan, load(s)?.0))
}

// ---------------------------------------------------------------------------------------------
// The Estimate object

/// The estimate of one plan: per-GPU peaks and their breakdown, host memory per node, the
/// verdict; `to_dict()` is `memplan estimate --format json`.
#[pyclass(module = "memplan", frozen, name = "Estimate")]
pub struct PyEstimate {
    plan: Plan,
    est: RustEstimate,
}

impl PyEstimate {
    fn json(&self) -> String {
        renderer(Format::Json).estimate(&Row {
            stages: &[],
            label: &self.plan.model.name,
            plan: &self.plan,
            estimate: &self.est,
        })
    }
}

#[pymethods]
impl PyEstimate {
    /// Peak allocated bytes per GPU (`torch.cuda.max_memory_allocated()`).
    #[getter]
    fn peak_allocated(&self) -> u64 {
        self.est.per_gpu.peak_allocated_bytes.get()
    }
    /// Peak reserved bytes per GPU (`torch.cuda.max_memory_reserved()`).
    #[getter]
    fn peak_reserved(&self) -> u64 {
        self.est.per_gpu.peak_reserved_bytes.get()
    }
    /// Reserved plus CUDA context and NCCL: what nvidia-smi shows.
    #[getter]
    fn device_total(&self) -> u64 {
        self.est.per_gpu.device_total_bytes.get()
    }
    /// The GPU's memory.
    #[getter]
    fn capacity(&self) -> u64 {
        self.est.per_gpu.capacity_bytes.get()
    }
    /// capacity - device_total (negative when it does not fit).
    #[getter]
    fn headroom(&self) -> i128 {
        self.est.per_gpu.headroom_bytes
    }
    /// Where the bytes go at the peak, by component (the JSON `per_gpu.breakdown`).
    #[getter]
    fn breakdown<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let b = &self.est.per_gpu.breakdown;
        let d = PyDict::new(py);
        for (k, v) in [
            ("master_params_bytes", b.master_params_bytes),
            ("unsharded_params_bytes", b.unsharded_params_bytes),
            ("gradients_bytes", b.gradients_bytes),
            ("gradient_buffers_bytes", b.gradient_buffers_bytes),
            ("optimizer_states_bytes", b.optimizer_states_bytes),
            ("optimizer_temporaries_bytes", b.optimizer_temporaries_bytes),
            ("activations_bytes", b.activations_bytes),
            ("backward_working_set_bytes", b.backward_working_set_bytes),
            ("logits_bytes", b.logits_bytes),
            ("workspace_bytes", b.workspace_bytes),
            ("inputs_bytes", b.inputs_bytes),
        ] {
            d.set_item(k, v.get())?;
        }
        Ok(d)
    }
    /// GPU and host both fit.
    #[getter]
    fn fits(&self) -> bool {
        self.est.fits
    }
    #[getter]
    fn fits_gpu(&self) -> bool {
        self.est.fits_gpu
    }
    #[getter]
    fn fits_host(&self) -> bool {
        self.est.fits_host
    }
    /// The phase of the step where the peak happens, e.g. "optimizer (first step)".
    #[getter]
    fn peak_phase(&self) -> &'static str {
        self.est.per_gpu.peak_phase
    }
    /// Host memory per node (offloaded state, pinned rounding, process runtime).
    #[getter]
    fn host_per_node(&self) -> u64 {
        self.est.host.per_node_bytes.get()
    }
    /// Host RAM per node the plan has.
    #[getter]
    fn host_capacity(&self) -> u64 {
        self.est.host.capacity_bytes.get()
    }
    /// The model's exact parameter count.
    #[getter]
    fn param_count(&self) -> u64 {
        self.plan.model.param_count()
    }
    /// Settings accepted but probably not meant.
    #[getter]
    fn warnings(&self) -> Vec<String> {
        self.plan.warnings.clone()
    }
    /// The plan in one line.
    #[getter]
    fn summary(&self) -> String {
        memplan::output::plan_summary(&self.plan)
    }
    /// The verdict in words, as the CLI prints it.
    #[getter]
    fn verdict(&self) -> String {
        memplan::output::verdict(&self.est)
    }
    /// The resolved plan (the JSON `plan`).
    #[getter]
    fn plan<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let text = serde_json::to_string(&self.plan).map_err(|e| {
            plan_error(
                py,
                Error::runtime(format!("the plan does not serialize: {e}")),
            )
        })?;
        json_loads(py, &text)
    }
    /// The `memplan estimate --format json` document.
    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        json_loads(py, &self.json())
    }
    /// The estimate as `memplan estimate` prints it: "table" (default), "markdown" or "json".
    #[pyo3(signature = (format = "table"))]
    fn render(&self, py: Python<'_>, format: &str) -> PyResult<String> {
        let f = match format {
            "table" => Format::Table,
            "json" => Format::Json,
            "markdown" => Format::Markdown,
            _ => {
                return Err(plan_error(
                    py,
                    Error::invalid(
                        "format",
                        format!("{format:?}"),
                        "one of table, json, markdown",
                    ),
                ))
            }
        };
        Ok(renderer(f).estimate(&Row {
            stages: &[],
            label: &self.plan.model.name,
            plan: &self.plan,
            estimate: &self.est,
        }))
    }
    fn __str__(&self) -> String {
        renderer(Format::Table).estimate(&Row {
            stages: &[],
            label: &self.plan.model.name,
            plan: &self.plan,
            estimate: &self.est,
        })
    }
    fn __repr__(&self) -> String {
        let g = &self.est.per_gpu;
        let gib = |b: memplan::units::Bytes| b.as_gib();
        let mut parts: Vec<String> = self
            .est
            .per_gpu
            .breakdown
            .items()
            .iter()
            .filter(|(_, b)| b.get() > 0)
            .map(|(n, b)| format!("{n} {:.2}", gib(*b)))
            .collect();
        if parts.is_empty() {
            parts.push("nothing".into());
        }
        format!(
            "<memplan.Estimate {}: {}; peak allocated {:.2} GiB, reserved {:.2} GiB, device total {:.2} GiB of {:.2} GiB at {}; host {:.2} GiB per node; breakdown GiB: {}{}>",
            memplan::output::plan_summary(&self.plan),
            if self.est.fits { "fits" } else if !self.est.fits_gpu { "OUT OF MEMORY (GPU)" } else { "OUT OF MEMORY (host)" },
            gib(g.peak_allocated_bytes),
            gib(g.peak_reserved_bytes),
            gib(g.device_total_bytes),
            gib(g.capacity_bytes),
            g.peak_phase,
            gib(self.est.host.per_node_bytes),
            parts.join(", "),
            if self.plan.warnings.is_empty() {
                String::new()
            } else {
                format!("; {} warning(s)", self.plan.warnings.len())
            }
        )
    }
    fn __eq__(&self, other: &Bound<'_, PyAny>) -> bool {
        other
            .downcast::<PyEstimate>()
            .is_ok_and(|o| o.get().plan == self.plan && o.get().est == self.est)
    }
    fn _repr_markdown_(&self) -> String {
        renderer(Format::Markdown).estimate(&Row {
            stages: &[],
            label: &self.plan.model.name,
            plan: &self.plan,
            estimate: &self.est,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Functions

/// Estimate one plan: per-GPU peaks and breakdown, host memory per node, the verdict.
///
/// ``plan`` is a plan dict (the plan-file schema) or the path of a plan JSON; ``example=``
/// a shipped example, ``torchtitan=`` a torchtitan TOML (with ``num_gpus`` and ``gpu``, as
/// torchrun would give them), ``model=`` a profile name, a Hugging Face ``config.json`` path
/// or a config dict. Other keywords are the CLI's flags (``micro_batch_size=4`` is
/// ``--micro-batch-size 4``) and override the plan. Raises ``memplan.PlanError`` with the
/// CLI's message.
///
/// >>> est = memplan.estimate(model="llama3-8b", gpu="rtx-a6000-48g", num_gpus=2,
/// ...                        micro_batch_size=1, seq_len=8192, ac="full")
/// >>> est.fits, est.peak_phase
/// (False, 'optimizer (first step)')
#[pyfunction]
#[pyo3(signature = (plan = None, **fields))]
fn estimate(
    py: Python<'_>,
    plan: Option<&Bound<'_, PyAny>>,
    fields: Option<&Bound<'_, PyDict>>,
) -> PyResult<PyEstimate> {
    let run = || -> Result<PyEstimate, Error> {
        let s = source(plan, fields)?;
        let plan = resolve(&s)?;
        let est = memplan::estimate::estimate_simulated(&plan, &Default::default(), "")?;
        Ok(PyEstimate { plan, est })
    };
    run().map_err(|e| plan_error(py, e))
}

fn headroom_milli(headroom: f64) -> Result<u64, Error> {
    if !(0.0..=0.5).contains(&headroom) {
        return Err(Error::invalid(
            "--headroom",
            headroom,
            "a fraction from 0 to 0.5",
        ));
    }
    Ok((headroom * 1000.0).round() as u64)
}

fn max_micro(max_micro_batch: i64) -> Result<u64, Error> {
    u64::try_from(max_micro_batch)
        .ok()
        .filter(|m| (1..=plan::MAX_DIM).contains(m))
        .ok_or_else(|| {
            Error::invalid(
                "--max-micro-batch",
                max_micro_batch,
                format!("an integer from 1 to {}", plan::MAX_DIM),
            )
        })
}

/// Search the plans that fit; returns the `memplan.search/1` document as JSON text.
#[pyfunction]
#[pyo3(signature = (plan, max_micro_batch, headroom, rank_by, top, fields))]
fn _search(
    py: Python<'_>,
    plan: Option<&Bound<'_, PyAny>>,
    max_micro_batch: i64,
    headroom: f64,
    rank_by: &str,
    top: i64,
    fields: Option<&Bound<'_, PyDict>>,
) -> PyResult<(String, Vec<String>)> {
    let s = source(plan, fields).map_err(|e| plan_error(py, e))?;
    let run = move || -> Result<(String, Vec<String>), Error> {
        let headroom_milli = headroom_milli(headroom)?;
        let max_micro_batch = max_micro(max_micro_batch)?;
        let top = usize::try_from(top)
            .ok()
            .filter(|t| (1..=1_000_000).contains(t))
            .ok_or_else(|| Error::invalid("--top", top, "an integer from 1 to 1000000"))?;
        let rank_by = match rank_by {
            "tokens" => RankBy::Tokens,
            "time" => RankBy::Time,
            _ => {
                return Err(Error::invalid(
                    "--rank-by",
                    format!("{rank_by:?}"),
                    "one of tokens, time",
                ))
            }
        };
        let constraints = s
            .args
            .search_constraints(max_micro_batch, headroom_milli, rank_by)?;
        let (base, file) = search_base(&s)?;
        let result = memplan::search::search(&file, &constraints)?;
        Ok((
            renderer(Format::Json).search(&result, top),
            base.warnings.clone(),
        ))
    };
    py.allow_threads(run).map_err(|e| plan_error(py, e))
}

/// The largest micro-batch a plan allows: the `memplan.max-batch/1` document as JSON text, and
/// the estimate at that micro-batch.
#[pyfunction]
#[pyo3(signature = (plan, max_micro_batch, headroom, fields))]
fn _max_batch(
    py: Python<'_>,
    plan: Option<&Bound<'_, PyAny>>,
    max_micro_batch: i64,
    headroom: f64,
    fields: Option<&Bound<'_, PyDict>>,
) -> PyResult<(String, Option<PyEstimate>)> {
    let run = || -> Result<(String, Option<PyEstimate>), Error> {
        let s = source(plan, fields)?;
        let headroom_milli = headroom_milli(headroom)?;
        let max_micro_batch = max_micro(max_micro_batch)?;
        let p = resolve(&s)?;
        let mut n = 0;
        let at = memplan::search::at_max_micro_batch(&p, max_micro_batch, headroom_milli, &mut n)?;
        let result = MaxBatch::new(&p, headroom, max_micro_batch, n, at.as_ref());
        let doc = renderer(Format::Json).max_batch(&result);
        Ok((doc, at.map(|(plan, est)| PyEstimate { plan, est })))
    };
    run().map_err(|e| plan_error(py, e))
}

/// The shipped model and GPU profiles: the `memplan.profiles/1` document as JSON text.
#[pyfunction]
fn _profiles(py: Python<'_>) -> PyResult<String> {
    let run = || -> Result<String, Error> {
        let models = profiles::MODELS
            .iter()
            .map(|(n, _)| profiles::model(n))
            .collect::<Result<Vec<_>, _>>()?;
        let gpus = profiles::GPUS
            .iter()
            .map(|(n, _)| profiles::gpu(n))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(renderer(Format::Json).profiles(&models, &gpus))
    };
    run().map_err(|e| plan_error(py, e))
}

/// Flushes Python's sys.stdout and sys.stderr, so text Python printed comes before ours.
fn flush_python(py: Python<'_>) {
    if let Ok(sys) = py.import("sys") {
        for name in ["stdout", "stderr"] {
            if let Ok(s) = sys.getattr(name) {
                if !s.is_none() {
                    let _ = s.call_method0("flush");
                }
            }
        }
    }
}

/// The `memplan` command: runs the CLI over `argv` (the first is the program name) on the
/// process's stdout and stderr and returns its exit code, 0 to 3. A panic is reported on one
/// line as an internal failure (exit 3), as the Rust binary does.
#[pyfunction]
fn main(py: Python<'_>, argv: Vec<OsString>) -> u8 {
    flush_python(py);
    py.allow_threads(|| {
        // The Python process keeps its own panic hook after the command.
        let previous = std::panic::take_hook();
        let (mut out, mut err) = (std::io::stdout().lock(), std::io::stderr().lock());
        let code = memplan::cli::main_guarded(argv, &mut out, &mut err);
        std::panic::set_hook(previous);
        code
    })
}

/// The shipped example plans' names.
#[pyfunction]
fn _examples() -> Vec<&'static str> {
    plan::EXAMPLES.iter().map(|(n, _)| *n).collect()
}

/// The names of the keyword arguments that are plan fields.
#[pyfunction]
fn _fields() -> Vec<&'static str> {
    FIELDS.to_vec()
}

#[pymodule]
fn _memplan(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<PyEstimate>()?;
    m.add_function(wrap_pyfunction!(estimate, m)?)?;
    m.add_function(wrap_pyfunction!(_search, m)?)?;
    m.add_function(wrap_pyfunction!(_max_batch, m)?)?;
    m.add_function(wrap_pyfunction!(_profiles, m)?)?;
    m.add_function(wrap_pyfunction!(_examples, m)?)?;
    m.add_function(wrap_pyfunction!(_fields, m)?)?;
    m.add_function(wrap_pyfunction!(main, m)?)?;
    Ok(())
}
