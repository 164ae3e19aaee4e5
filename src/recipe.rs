//! YAML recipes: one file that says which models, prompts, sampling settings,
//! thresholds and outputs a run uses, for any of the three jobs:
//!
//! ```yaml
//! note: printed before the run         # optional
//! models: {generator: ..., inpaint_generator: ..., rahf: ..., device: auto, dtype: auto, rahf_dtype: fp32,
//!          variant: fp16,                          # optional: the weights variant
//!          loras: [a.safetensors, {path: b.safetensors, scale: 0.5}],   # optional, see crate::diffusion::lora
//!          scorers: {rahf.b: ..., pickscore: ...}}   # other scorer checkpoints, by instance name
//! sampling: {steps: 30, guidance_scale: 7.5, height: 512, width: 512, scheduler: dpm++2m,
//!            seed: 0, batch_size: 4, negative_prompt: "", clip_skip: 1}
//! output: ../out/quickstart            # job X writes into output/X/
//! verify: [rahf.b]                    # held-out verifiers of every job (optional)
//! filter: {prompts: ..., samples: 8, threshold: 0.8, score: plausibility, keep: best, pairs: false}
//! inpaint: {input: filter, mask_threshold: 0.5, dilate: 16, candidates: 4, strength: 1.0,
//!           score: "0.7*rahf:plausibility+0.3*rahf.b:aesthetics", verify: []}
//! guide: {prompts: ..., strength: 1.0, every: 1, recurrence: 1, score: aesthetics, images_per_prompt: 1,
//!         compare_unguided: true, through_unet: true, decoder: vae,   # decoder: tiny:DIR (a TAESD)
//!         method: gradient, region: implausibility, mask_threshold: 0.5, dilate: 16,  # region: optional
//!         best_of_n: false}   # method: noise takes iterations: 10, lr: 0.05, regularizer: 1.0
//! ```
//!
//! * `score` is a score spec (`crate::scorers::spec`); `verify` a list of
//!   scorer instances. A job's own `verify:` replaces the shared one.
//!
//! * The jobs present run in the order filter → inpaint → guide.
//! * Relative paths (`output`, prompt lists, `inpaint.input`, `models.rahf`,
//!   `models.loras`, and model folders) resolve against the folder of the recipe file, so a recipe
//!   means the same thing from whatever directory it is run. A model that is not
//!   a folder there and reads `ORG/NAME[@REV]` is a Hugging Face repo id, found
//!   in the HF cache or downloaded into it (`models.variant: fp16` fetches
//!   and reads the fp16 weights; `HF_HUB_OFFLINE=1`: the cache alone).
//! * `inpaint.input: filter` inpaints what this recipe's `filter` keeps.
//! * `sampling.height`/`width` left out default to the generator's native size
//!   (UNet `sample_size` × VAE scale factor, as diffusers does), so the same
//!   recipe suits a tiny test model and SD 1.5 alike.
//! * With `--shard i/n` (n > 1), job X writes into `output/X/shard-i-of-n/`;
//!   `orchestrate merge` (`--recipe R --job X`) joins them into `output/X/`.
//! * Jobs are stages: a job that reads another's output (`inpaint.input:
//!   filter`) reads its whole result — the unsharded run's, or the merge of
//!   its shards. A sharded run of such a recipe therefore goes one job at a
//!   time (`--job`), each merged before the next ([`Recipe::check_stages`]);
//!   `run --devices` and `scripts/slurm/submit.sh` do exactly that.
//!
//! Every error names `file:line:column` and the field's YAML path. Syntax,
//! type and unknown-field errors come from the deserializer with a location;
//! range checks happen after deserialization (each job's `validate()`), so the
//! recipe keeps a map from field path to location, built from a second,
//! located parse of the same text, to point those errors at the YAML too.
use crate::error::{Error, Result};
use crate::diffusion::model_dir::PipelineSource;
use crate::jobs::common::{check_generator_source, check_rahf};
use crate::jobs::filter::{self, FilterOptions};
use crate::jobs::guide::{self, GuideOptions};
use crate::jobs::inpaint::{self, InpaintOptions};
use crate::jobs::finetune::FinetuneJobOptions;
use crate::jobs::prompts::read_prompts;
use crate::jobs::{CommonOptions, JobSummary, ModelOptions, RunContext, SamplingOptions, Shard};
use serde::de::{Deserializer, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_saphyr::Spanned;
use std::path::{Path, PathBuf};

/// The `inpaint.input` value that means "what this recipe's filter kept".
pub const FROM_FILTER: &str = "filter";

/// The file as written (after YAML, before path resolution).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRecipe {
    #[serde(default)]
    note: Option<String>,
    models: ModelOptions,
    #[serde(default)]
    sampling: SamplingOptions,
    output: PathBuf,
    /// Held-out verifiers of every job that does not list its own.
    #[serde(default)]
    verify: Option<Vec<String>>,
    #[serde(default)]
    filter: Option<FilterOptions>,
    #[serde(default)]
    inpaint: Option<InpaintOptions>,
    #[serde(default)]
    guide: Option<GuideOptions>,
    #[serde(default)]
    finetune: Option<FinetuneJobOptions>,
}

/// A 1-based line and column in the recipe file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Loc {
    pub line: u64,
    pub column: u64,
}

impl Loc {
    fn of(l: &serde_saphyr::Location) -> Loc {
        Loc { line: l.line(), column: l.column() }
    }
}

/// One node of the located parse: its YAML path (`filter.threshold`,
/// `a.b[2]`; empty for the document), where its key and value start, and the
/// text of a scalar value.
#[derive(Debug, Clone)]
struct Entry {
    path: String,
    key: Option<Loc>,
    value: Loc,
    scalar: Option<String>,
    null: bool,
}

/// Field path → location, for every key and value in the recipe.
#[derive(Debug, Clone, Default)]
pub struct Locations {
    entries: Vec<Entry>,
}

/// The located parse: enough of the YAML tree to know where everything is.
#[derive(Debug)]
enum Node {
    Null,
    Scalar(String),
    Seq(Vec<Spanned<Node>>),
    Map(Vec<(Spanned<String>, Spanned<Node>)>),
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Node;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("any YAML value")
            }
            fn visit_bool<E>(self, v: bool) -> std::result::Result<Node, E> {
                Ok(Node::Scalar(v.to_string()))
            }
            fn visit_i64<E>(self, v: i64) -> std::result::Result<Node, E> {
                Ok(Node::Scalar(v.to_string()))
            }
            fn visit_u64<E>(self, v: u64) -> std::result::Result<Node, E> {
                Ok(Node::Scalar(v.to_string()))
            }
            fn visit_i128<E>(self, v: i128) -> std::result::Result<Node, E> {
                Ok(Node::Scalar(v.to_string()))
            }
            fn visit_u128<E>(self, v: u128) -> std::result::Result<Node, E> {
                Ok(Node::Scalar(v.to_string()))
            }
            fn visit_f64<E>(self, v: f64) -> std::result::Result<Node, E> {
                Ok(Node::Scalar(v.to_string()))
            }
            fn visit_str<E>(self, v: &str) -> std::result::Result<Node, E> {
                Ok(Node::Scalar(v.to_string()))
            }
            fn visit_unit<E>(self) -> std::result::Result<Node, E> {
                Ok(Node::Null)
            }
            fn visit_none<E>(self) -> std::result::Result<Node, E> {
                Ok(Node::Null)
            }
            fn visit_some<D2: Deserializer<'de>>(self, d: D2) -> std::result::Result<Node, D2::Error> {
                Node::deserialize(d)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> std::result::Result<Node, A::Error> {
                let mut items = Vec::new();
                while let Some(x) = a.next_element()? {
                    items.push(x);
                }
                Ok(Node::Seq(items))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> std::result::Result<Node, A::Error> {
                let mut items = Vec::new();
                while let Some(k) = a.next_key::<Spanned<String>>()? {
                    let v = a.next_value()?;
                    items.push((k, v));
                }
                Ok(Node::Map(items))
            }
        }
        d.deserialize_any(V)
    }
}

impl Locations {
    fn flatten(&mut self, path: String, key: Option<Loc>, node: &Spanned<Node>) {
        let value = Loc::of(&node.referenced);
        let (scalar, null) = match &node.value {
            Node::Scalar(s) => (Some(s.clone()), false),
            Node::Null => (None, true),
            _ => (None, false),
        };
        self.entries.push(Entry { path: path.clone(), key, value, scalar, null });
        match &node.value {
            Node::Map(items) => {
                for (k, v) in items {
                    let p = if path.is_empty() { k.value.clone() } else { format!("{path}.{}", k.value) };
                    self.flatten(p, Some(Loc::of(&k.referenced)), v);
                }
            }
            Node::Seq(items) => {
                for (i, v) in items.iter().enumerate() {
                    self.flatten(format!("{path}[{i}]"), None, v);
                }
            }
            _ => {}
        }
    }

    fn get(&self, path: &str) -> Option<&Entry> {
        self.entries.iter().find(|e| e.path == path)
    }

    /// Where `path` is written: its key (where a reader looks for the field),
    /// else its value (a sequence item).
    pub fn of(&self, path: &str) -> Option<Loc> {
        self.get(path).map(|e| e.key.unwrap_or(e.value))
    }

    /// Where the value of `path` starts.
    pub fn value_of(&self, path: &str) -> Option<Loc> {
        self.get(path).map(|e| e.value)
    }

    /// The field a deserializer error at `at` is about. An unknown field is
    /// reported at its key; a wrong type or a missing field at the value (a
    /// missing field at the mapping that lacks it). When nothing starts
    /// exactly there, the last node that starts before it contains it.
    fn at(&self, at: Loc, unknown_field: bool) -> Option<&Entry> {
        let by_key = self.entries.iter().find(|e| e.key == Some(at));
        // The node whose value starts there (a mapping value starts where its first key does).
        let by_value = self.entries.iter().rev().filter(|e| e.value == at).min_by_key(|e| depth(&e.path));
        let exact = if unknown_field { by_key.or(by_value) } else { by_value.or(by_key) };
        exact.or_else(|| {
            self.entries.iter().filter(|e| e.key.unwrap_or(e.value) <= at).max_by_key(|e| e.key.unwrap_or(e.value))
        })
    }

    /// The paths written under `section` (e.g. every `filter.*`).
    fn under<'a>(&'a self, section: &'a str) -> impl Iterator<Item = &'a Entry> + 'a {
        self.entries.iter().filter(move |e| {
            e.path.len() > section.len() && e.path.starts_with(section) && e.path.as_bytes()[section.len()] == b'.'
        })
    }
}

fn depth(path: &str) -> usize {
    path.matches('.').count() + path.matches('[').count()
}

/// A parsed recipe, paths resolved. Build with [`Recipe::load`] (parse +
/// every check that needs no model) or [`Recipe::parse`] (parse only).
#[derive(Debug, Clone)]
pub struct Recipe {
    /// The recipe file, as given.
    pub file: PathBuf,
    /// Printed before the run (the quickstart says its weights are random).
    pub note: Option<String>,
    pub common: CommonOptions,
    /// Root of the outputs: job X writes into `output/X/`.
    pub output: PathBuf,
    pub filter: Option<FilterOptions>,
    /// `input` resolved; `output/filter` when the recipe says `input: filter`.
    pub inpaint: Option<InpaintOptions>,
    /// Whether `inpaint.input` is this recipe's filter output.
    pub inpaint_from_filter: bool,
    pub guide: Option<GuideOptions>,
    /// `data` resolved; `output/filter` when the recipe says `data: filter`.
    pub finetune: Option<FinetuneJobOptions>,
    /// Whether `finetune.data` is this recipe's filter output.
    pub finetune_from_filter: bool,
    /// `sampling.height` / `sampling.width` not given: each takes the
    /// generator's native size instead of the 512 default once the model is
    /// known ([`Recipe::resolve_size`]), as diffusers defaults each on its own.
    pub height_from_model: bool,
    pub width_from_model: bool,
    /// `sampling.scheduler` not given: the generator folder's own scheduler
    /// when implemented here, else the dpm++2m default.
    pub scheduler_from_model: bool,
    pub locations: Locations,
}

/// What `--dry-run` found: one line per check and per job that would run.
#[derive(Debug, Clone, Serialize)]
pub struct DryRun {
    pub lines: Vec<String>,
}

impl Recipe {
    /// Parses and checks a recipe: syntax, types, unknown fields, then each
    /// section's `validate()` (ranges, sizes, files exist). Models are not touched.
    pub fn load(file: &Path) -> Result<Recipe> {
        let recipe = Recipe::parse(file)?;
        recipe.validate()?;
        Ok(recipe)
    }

    /// Syntax, types and unknown fields only (plus the sampling settings, which
    /// need no file); paths are resolved but not checked.
    pub fn parse(file: &Path) -> Result<Recipe> {
        let text = std::fs::read_to_string(file).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::Missing { path: file.to_path_buf(), what: "recipe file".into() }
            } else {
                Error::io(file, e)
            }
        })?;
        Recipe::parse_str(&text, file)
    }

    /// [`Recipe::parse`] of `text` as if read from `file` (errors name it;
    /// relative paths resolve against its folder).
    pub fn parse_str(text: &str, file: &Path) -> Result<Recipe> {
        let err_at = |at: Loc, field: &str, msg: &str| located(file, at, field, msg);
        let saphyr_msg = |e: &serde_saphyr::Error| {
            use serde_saphyr::MessageFormatter;
            serde_saphyr::DefaultMessageFormatter.format_message(e.without_snippet()).into_owned()
        };
        // Pass 1: the located tree. It fails only on YAML syntax.
        let tree: Spanned<Node> = serde_saphyr::from_str(text).map_err(|e| {
            let at = e.location().map(|l| Loc::of(&l)).unwrap_or(Loc { line: 1, column: 1 });
            err_at(at, "", &saphyr_msg(&e))
        })?;
        let mut locations = Locations::default();
        locations.flatten(String::new(), None, &tree);
        if !matches!(tree.value, Node::Map(_)) {
            return Err(err_at(
                Loc::of(&tree.referenced),
                "",
                "a recipe is a mapping with `models`, `output` and at least one of `filter`, `inpaint`, `guide`",
            ));
        }
        // A job's key with nothing under it would silently run nothing.
        for section in ["models", "sampling", "filter", "inpaint", "guide", "finetune"] {
            if let Some(e) = locations.get(section).filter(|e| e.null) {
                return Err(err_at(
                    e.key.unwrap_or(e.value),
                    section,
                    "the section is empty: give its settings (`{}` for all defaults) or leave the key out",
                ));
            }
        }

        // Pass 2: the typed recipe.
        let raw: RawRecipe = serde_saphyr::from_str(text).map_err(|e| {
            let msg = saphyr_msg(&e);
            let Some(at) = e.location().map(|l| Loc::of(&l)) else {
                return err_at(Loc { line: 1, column: 1 }, "", &msg);
            };
            match locations.at(at, msg.starts_with("unknown field")) {
                Some(entry) => {
                    let mut msg = msg;
                    if let Some(s) = entry.scalar.as_ref().filter(|_| entry.value == at) {
                        if !msg.contains(s.as_str()) {
                            msg = format!("{msg} (found `{s}`)");
                        }
                    }
                    err_at(at, &entry.path, &msg)
                }
                None => err_at(at, "", &msg),
            }
        })?;
        if raw.filter.is_none() && raw.inpaint.is_none() && raw.guide.is_none() && raw.finetune.is_none() {
            return Err(err_at(
                Loc { line: 1, column: 1 },
                "",
                "nothing to run: add a `filter`, `inpaint`, `guide` or `finetune` section",
            ));
        }

        let dir = file.parent().map(Path::to_path_buf).unwrap_or_default();
        let dir = if dir.as_os_str().is_empty() { PathBuf::from(".") } else { dir };
        let output = resolve(&dir, &raw.output);
        let mut common = CommonOptions { models: raw.models, sampling: raw.sampling };
        common.models.generator = resolve_model_spec(&dir, &common.models.generator);
        common.models.inpaint_generator = common.models.inpaint_generator.map(|g| resolve_model_spec(&dir, &g));
        let m = &mut common.models;
        for spec in [&mut m.config, &mut m.inpaint_config, &mut m.refiner, &mut m.refiner_config, &mut m.vae] {
            *spec = spec.take().map(|s| resolve_model_spec(&dir, &s));
        }
        common.models.rahf = common.models.rahf.map(|r| PathBuf::from(resolve_model_spec(&dir, &r.to_string_lossy())));
        for lora in &mut common.models.loras {
            lora.path = resolve(&dir, &lora.path);
        }
        for spec in common.models.scorers.values_mut() {
            // A scorer checkpoint may name several files: `MLP.pth,CLIP_DIR`.
            *spec = spec.split(',').map(|part| resolve_model_spec(&dir, part)).collect::<Vec<_>>().join(",");
        }
        // A job without its own `verify:` takes the shared one.
        let shared_verify = |job: &str, own: &mut Vec<String>| {
            if let (Some(v), None) = (&raw.verify, locations.get(&format!("{job}.verify"))) {
                *own = v.clone();
            }
        };

        let filter = raw.filter.map(|mut f| {
            f.prompts = resolve(&dir, &f.prompts);
            shared_verify("filter", &mut f.verify);
            f
        });
        let mut inpaint_from_filter = false;
        let inpaint = match raw.inpaint {
            None => None,
            Some(mut i) => {
                if i.input == Path::new(FROM_FILTER) {
                    if filter.is_none() {
                        let at = locations.value_of("inpaint.input").unwrap_or(Loc { line: 1, column: 1 });
                        return Err(err_at(
                            at,
                            "inpaint.input",
                            "`filter` means this recipe's filter output, but the recipe has no `filter` section",
                        ));
                    }
                    inpaint_from_filter = true;
                    i.input = job_dir(&output, "filter", Shard::default());
                } else {
                    i.input = resolve(&dir, &i.input);
                }
                shared_verify("inpaint", &mut i.verify);
                Some(i)
            }
        };
        let guide = raw.guide.map(|mut g| {
            g.prompts = resolve(&dir, &g.prompts);
            if let crate::guidance::GuideDecoder::Tiny(d) = &mut g.decoder {
                *d = resolve(&dir, d);
            }
            shared_verify("guide", &mut g.verify);
            g
        });
        let mut finetune_from_filter = false;
        let finetune = match raw.finetune {
            None => None,
            Some(mut t) => {
                if t.data == Path::new(crate::jobs::finetune::FROM_FILTER) {
                    if filter.is_none() {
                        let at = locations.value_of("finetune.data").or_else(|| locations.of("finetune"));
                        return Err(err_at(
                            at.unwrap_or(Loc { line: 1, column: 1 }),
                            "finetune.data",
                            "`filter` (the default) means this recipe's filter output, but the recipe has no `filter` \
                             section: add one, or give `data:` an imagefolder",
                        ));
                    }
                    finetune_from_filter = true;
                    t.data = job_dir(&output, "filter", Shard::default());
                } else {
                    t.data = resolve(&dir, &t.data);
                }
                if let Some(e) = &mut t.evaluate {
                    e.prompts = resolve(&dir, &e.prompts);
                }
                Some(t)
            }
        };
        let height_from_model = locations.get("sampling.height").is_none();
        let width_from_model = locations.get("sampling.width").is_none();
        let scheduler_from_model = locations.get("sampling.scheduler").is_none();
        let recipe = Recipe {
            file: file.to_path_buf(),
            note: raw.note,
            common,
            output,
            filter,
            inpaint,
            inpaint_from_filter,
            guide,
            finetune,
            finetune_from_filter,
            height_from_model,
            width_from_model,
            scheduler_from_model,
            locations,
        };
        recipe.locate("sampling", recipe.common.sampling.validate())?;
        Ok(recipe)
    }

    /// Moves every output under `output` (`--output`), the chained
    /// `inpaint.input: filter` included.
    pub fn set_output(&mut self, output: PathBuf) {
        self.output = output;
        if self.inpaint_from_filter {
            if let Some(i) = &mut self.inpaint {
                i.input = job_dir(&self.output, "filter", Shard::default());
            }
        }
        if self.finetune_from_filter {
            if let Some(t) = &mut self.finetune {
                t.data = job_dir(&self.output, "filter", Shard::default());
            }
        }
    }

    /// The jobs this recipe runs, in order.
    pub fn jobs(&self) -> Vec<&'static str> {
        let mut jobs = Vec::new();
        if self.filter.is_some() {
            jobs.push("filter");
        }
        if self.inpaint.is_some() {
            jobs.push("inpaint");
        }
        if self.guide.is_some() {
            jobs.push("guide");
        }
        if let Some(t) = &self.finetune {
            jobs.push("finetune");
            if t.evaluate.is_some() {
                jobs.push("evaluate");
            }
        }
        jobs
    }

    /// Whether `job` splits into shards (`finetune` and `evaluate` run as
    /// one process; sharded runners give them one worker).
    pub fn shardable(job: &str) -> bool {
        !matches!(job, "finetune" | "evaluate")
    }

    /// Every check that needs no model: each section's `validate()`, with the
    /// error pointed at the field it is about.
    pub fn validate(&self) -> Result<()> {
        self.locate("sampling", self.common.sampling.validate())?;
        if let Some(f) = &self.filter {
            self.locate("filter", f.validate())?;
        }
        if let Some(i) = &self.inpaint {
            // With `input: filter` the filter step makes that folder: only the ranges are checkable now.
            let r = if self.inpaint_from_filter { i.validate_ranges() } else { i.validate() };
            self.locate("inpaint", r)?;
        }
        if let Some(g) = &self.guide {
            self.locate("guide", g.validate())?;
        }
        if let Some(t) = &self.finetune {
            self.locate("finetune", t.validate(&self.common))?;
            if !self.finetune_from_filter {
                self.locate("finetune", crate::finetune::data::ImageFolder::open(&t.data).map(drop))?;
            }
        }
        Ok(())
    }

    /// Points an error from `section`'s checks at the field it names: the
    /// longest field of the section written in the recipe whose name (or
    /// `--flag` spelling) the message mentions, else the section itself.
    fn locate(&self, section: &str, r: Result<()>) -> Result<()> {
        let Err(e) = r else { return Ok(()) };
        if let Error::Field { .. } = e {
            return Err(self.locate_field(e));
        }
        let text = error_text(&e);
        let norm = normalize(&text);
        let found = self
            .locations
            .under(section)
            .filter(|entry| depth(&entry.path) == depth(section) + 1)
            .filter_map(|entry| {
                let leaf = entry.path.rsplit('.').next().unwrap_or(&entry.path);
                find_word(&norm, leaf).map(|(pos, exact)| (entry, exact, leaf.len(), pos))
            })
            .max_by(|a, b| a.1.cmp(&b.1).then(a.2.cmp(&b.2)).then(b.3.cmp(&a.3)));
        let (field, at) = match found {
            // At the value: that is what is out of range (or names a missing file).
            Some((entry, ..)) => (entry.path.clone(), entry.value),
            None => (section.to_string(), self.locations.of(section).unwrap_or(Loc { line: 1, column: 1 })),
        };
        Err(located(&self.file, at, &field, &strip_field(&text, &field)))
    }

    /// Replaces the 512 default with the generator's native size when the
    /// recipe gives no `height`/`width` (needs the generator's configs).
    pub fn resolve_size(&mut self) -> Result<()> {
        if self.scheduler_from_model {
            let source = self.common.models.source(&self.common.models.generator);
            let info = self.at_field("models.generator", check_generator_source(&source))?;
            if let Some(kind) = info.default_scheduler {
                self.common.sampling.scheduler = kind.name().to_string();
            }
            self.scheduler_from_model = false;
        }
        if !self.height_from_model && !self.width_from_model {
            return Ok(());
        }
        let source = self.common.models.source(&self.common.models.generator);
        let (h, w) = self.at_field("models.generator", native_size(&source))?;
        if self.height_from_model {
            self.common.sampling.height = h;
        }
        if self.width_from_model {
            self.common.sampling.width = w;
        }
        (self.height_from_model, self.width_from_model) = (false, false);
        self.locate("sampling", self.common.sampling.validate())
    }

    /// Exactly the checks a real run makes before it writes anything, short
    /// of loading weights: each section's ranges, devices and dtypes, every
    /// model config (validated) and `clip_skip` against the text encoder, the
    /// prompt lists and ids, each job's output folder (not a file, not a
    /// foreign folder, no earlier run with other settings). Returns what would run.
    /// `only`: the one job `--job` names (all of the recipe's when `None`).
    pub fn dry_run(&mut self, shard: Shard, only: Option<&str>) -> Result<DryRun> {
        self.validate()?;
        let jobs = self.selected_jobs(only)?;
        self.check_stages(shard, only)?;
        let mut lines = Vec::new();
        let m = self.common.models.clone();
        let gen = self.at_field("models.generator", check_generator_source(&m.source(&m.generator)))?;
        // The folder's own scheduler and size, where the recipe leaves them out, before they are checked.
        self.resolve_size()?;
        self.at_field("sampling.scheduler", gen.check_scheduler(&self.common.sampling.scheduler))?;
        lines.push(format!("generator  {}", gen.describe(&m.generator)));
        if self.inpaint.is_some() {
            if let Some(spec) = &m.inpaint_generator {
                let ig = self.at_field("models.inpaint_generator", check_generator_source(&m.source(spec)))?;
                lines.push(format!("inpaint    {}", ig.describe(spec)));
            }
        }
        if let Some(r) = &m.rahf {
            let rahf = self.at_field("models.rahf", check_rahf(r))?;
            lines.push(format!("rahf       {}: {rahf}", r.display()));
        }
        let checked = crate::jobs::common::check_scorer_checkpoints(&m).map_err(|e| self.locate_field(e))?;
        for (name, spec, about) in checked.into_iter().filter(|(n, ..)| n != "rahf") {
            lines.push(format!("scorer     {name} = {spec}: {about}"));
        }
        let s = &self.common.sampling;
        lines.push(format!(
            "sampling   {} steps {}, guidance scale {}, {}x{} px{}, seed {}, batch {}",
            s.steps,
            s.scheduler,
            s.guidance_scale,
            s.width,
            s.height,
            if self.locations.get("sampling.height").is_none() || self.locations.get("sampling.width").is_none() {
                " (what the recipe leaves out: the generator's native size)"
            } else {
                ""
            },
            s.seed,
            s.batch_size
        ));
        let c = &self.common;
        let located = |r: Result<()>| r.map_err(|e| self.locate_field(e));
        let selected = |job: &str| jobs.contains(&job);
        if let Some(f) = self.filter.as_ref().filter(|_| selected("filter")) {
            located(filter::prepare(f, c, &job_dir(&self.output, "filter", shard)).map(|_| ()))?;
        }
        if let Some(i) = self.inpaint.as_ref().filter(|_| selected("inpaint")) {
            // With `input: filter` the filter stage makes the input, unless it is there already.
            let pending = self.inpaint_from_filter && finished_result(&i.input, "filter").is_err();
            located(inpaint::prepare(i, c, &job_dir(&self.output, "inpaint", shard), pending).map(|_| ()))?;
        }
        if let Some(g) = self.guide.as_ref().filter(|_| selected("guide")) {
            located(guide::prepare(g, c, &job_dir(&self.output, "guide", shard)).map(|_| ()))?;
        }
        lines.extend(self.plan()?.into_iter().filter(|l| jobs.iter().any(|j| l.starts_with(j))));
        Ok(DryRun { lines })
    }

    /// One line per job: what it reads, what it does, where it writes.
    pub fn plan(&self) -> Result<Vec<String>> {
        let mut lines = Vec::new();
        if let Some(f) = &self.filter {
            let n = read_prompts(&f.prompts)?.len();
            lines.push(format!(
                "filter     {n} prompts from {} x {} samples (seeds {}..{}); keep {} with {} >= {}{} -> {}",
                f.prompts.display(),
                f.samples,
                self.common.sampling.seed,
                self.common.sampling.seed + f.samples as u64 - 1,
                f.keep,
                f.score,
                f.threshold,
                verify_note(&f.verify),
                job_dir(&self.output, "filter", Shard::default()).display()
            ));
        }
        if let Some(i) = &self.inpaint {
            let from = if self.inpaint_from_filter {
                "the images filter keeps".to_string()
            } else {
                let n = inpaint::read_inputs(&i.input)?.len();
                format!("{n} images from {}", i.input.display())
            };
            lines.push(format!(
                "inpaint    {from}: mask where implausibility > {}, dilated {} px; {} candidates, strength {}; choose by {}{} -> {}",
                i.mask_threshold,
                i.dilate,
                i.candidates,
                i.strength,
                i.score,
                verify_note(&i.verify),
                job_dir(&self.output, "inpaint", Shard::default()).display()
            ));
        }
        if let Some(g) = &self.guide {
            let n = read_prompts(&g.prompts)?.len();
            let method = match g.method {
                crate::jobs::guide::GuideMethod::Gradient => format!(
                    "{} guidance, strength {}, every {} step(s), recurrence {}{}",
                    g.score,
                    g.strength,
                    g.every,
                    g.recurrence,
                    g.region.map_or(String::new(), |r| format!(", only inside the {r} region"))
                ),
                crate::jobs::guide::GuideMethod::Noise => {
                    format!("{} noise optimisation, {} iterations, lr {}", g.score, g.iterations, g.lr)
                }
            };
            let compare = match (g.compare_unguided, g.best_of_n) {
                (true, true) => ", compared with unguided and best-of-N at equal time",
                (true, false) => ", compared with unguided",
                _ => "",
            };
            lines.push(format!(
                "guide      {n} prompts from {} x {} image(s): {method}{compare}{}{} -> {}",
                g.prompts.display(),
                g.images_per_prompt,
                match &g.decoder {
                    crate::guidance::GuideDecoder::Tiny(d) => format!(", gradient through the tiny decoder {}", d.display()),
                    crate::guidance::GuideDecoder::Vae => String::new(),
                },
                verify_note(&g.verify),
                job_dir(&self.output, "guide", Shard::default()).display()
            ));
        }
        if let Some(t) = &self.finetune {
            let from = if self.finetune_from_filter { "the images filter keeps".to_string() } else { t.data.display().to_string() };
            lines.push(format!(
                "finetune   LoRA rank {} on {from}: {} steps, lr {}, batch {}x{} -> {}",
                t.rank,
                t.steps,
                t.lr,
                t.batch_size,
                t.gradient_accumulation_steps,
                job_dir(&self.output, "finetune", Shard::default()).display()
            ));
            if let Some(e) = &t.evaluate {
                let n = read_prompts(&e.prompts)?.len();
                let samples = e.samples.or(self.filter.as_ref().map(|f| f.samples)).unwrap_or(8);
                lines.push(format!(
                    "evaluate   {n} held-out prompts from {} x {samples} samples, without and with the LoRA -> {}",
                    e.prompts.display(),
                    job_dir(&self.output, "evaluate", Shard::default()).display()
                ));
            }
        }
        Ok(lines)
    }

    /// The jobs `--job` selects: `only` (which the recipe must have), else all of them in order.
    pub fn selected_jobs(&self, only: Option<&str>) -> Result<Vec<&'static str>> {
        let jobs = self.jobs();
        match only {
            None => Ok(jobs),
            Some(j) => match jobs.iter().find(|x| **x == j) {
                Some(x) => Ok(vec![*x]),
                None if ["filter", "inpaint", "guide", "finetune", "evaluate"].contains(&j) => Err(Error::Invalid(format!(
                    "--job {j}: {} has no `{j}` section (it runs {})",
                    self.file.display(),
                    jobs.join(", ")
                ))),
                None => Err(Error::Invalid(format!("--job `{j}`: expected filter, inpaint, guide, finetune or evaluate"))),
            },
        }
    }

    /// The stage rule of sharded runs: a job that reads another job's
    /// output (`inpaint.input: filter`) reads its merged result, so a run of
    /// one shard (n > 1) cannot go on from its own filter shard into inpaint;
    /// it runs one job at a time (`--job`), with a merge in between.
    pub fn check_stages(&self, shard: Shard, only: Option<&str>) -> Result<()> {
        if shard.count > 1 {
            let jobs = self.selected_jobs(only)?;
            if let Some(j) = jobs.iter().find(|j| !Recipe::shardable(j)) {
                return Err(Error::Invalid(format!(
                    "{}: `{j}` runs as one process, so a sharded run takes one job at a time: `run --shard i/n --job \
                     filter` on every shard, `orchestrate merge --recipe {} --job filter`, then `run --job {j}` \
                     without --shard (scripts/slurm/submit.sh and `run --devices` do this)",
                    self.file.display(),
                    self.file.display()
                )));
            }
        }
        if shard.count > 1 && only.is_none() && self.inpaint_from_filter {
            return Err(Error::Invalid(format!(
                "{}: inpaint reads this recipe's filter output (`inpaint.input: filter`), so a sharded run takes one job \
                 at a time: `run --shard i/n --job filter` on every shard, `orchestrate merge --recipe {} --job filter`, \
                 then `--job inpaint` the same way (scripts/slurm/submit.sh and `run --devices` do this)",
                self.file.display(),
                self.file.display()
            )));
        }
        Ok(())
    }

    /// Runs the jobs in order (`only`: just that one); `done` sees each job's
    /// summary as it finishes. See [`Recipe::check_stages`] for shards.
    pub fn run(
        &mut self,
        shard: Shard,
        only: Option<&str>,
        json: bool,
        done: &mut dyn FnMut(&JobSummary),
    ) -> Result<Vec<JobSummary>> {
        self.validate()?;
        self.resolve_size()?;
        let jobs = self.selected_jobs(only)?;
        self.check_stages(shard, only)?;
        let mut summaries = Vec::new();
        for job in jobs {
            let s = match self.skipped(job)? {
                Some(s) => s,
                None => self.run_job(job, shard, json)?,
            };
            done(&s);
            summaries.push(s);
        }
        Ok(summaries)
    }

    /// The summary of a job that has nothing to do: inpaint when this
    /// recipe's filter kept no image. `None` when the job is to run.
    pub fn skipped(&self, job: &str) -> Result<Option<JobSummary>> {
        if matches!(job, "finetune" | "evaluate") && self.finetune_from_filter {
            let filter_out = job_dir(&self.output, "filter", Shard::default());
            finished_result(&filter_out, "filter")?;
            if kept_nothing(&filter_out)? {
                return Ok(Some(JobSummary {
                    job: job.into(),
                    out: job_dir(&self.output, job, Shard::default()),
                    figures: serde_json::json!({"skipped": "filter kept no image"}),
                    lines: vec![format!("skipped: filter kept no image, so there is nothing to {job}")],
                }));
            }
        }
        match (&self.inpaint, job) {
            (Some(i), "inpaint") if self.inpaint_from_filter => {
                finished_result(&i.input, "filter")?;
                if kept_nothing(&i.input)? {
                    return Ok(Some(JobSummary {
                        job: "inpaint".into(),
                        out: job_dir(&self.output, "inpaint", Shard::default()),
                        figures: serde_json::json!({"skipped": "filter kept no image"}),
                        lines: vec!["skipped: filter kept no image, so there is nothing to inpaint".into()],
                    }));
                }
                Ok(None)
            }
            _ => Ok(None),
        }
    }

    /// Runs one job of the recipe (its shard `shard`) into `output/JOB[/shard-i-of-n]`.
    pub fn run_job(&self, job: &str, shard: Shard, json: bool) -> Result<JobSummary> {
        let ctx = RunContext { out: job_dir(&self.output, job, shard), shard, json };
        let r = match (job, &self.filter, &self.inpaint, &self.guide) {
            ("filter", Some(f), _, _) => filter::run(f, &self.common, &ctx),
            ("inpaint", _, Some(i), _) => inpaint::run(i, &self.common, &ctx),
            ("guide", _, _, Some(g)) => guide::run(g, &self.common, &ctx),
            ("finetune", ..) if self.finetune.is_some() => {
                let t = self.finetune.as_ref().expect("checked");
                crate::jobs::finetune::run(t, &t.data, &self.common, &ctx)
            }
            ("evaluate", ..) if self.finetune.as_ref().is_some_and(|t| t.evaluate.is_some()) => {
                let t = self.finetune.as_ref().expect("checked");
                let lora = crate::jobs::finetune::trained_lora(&job_dir(&self.output, "finetune", Shard::default()))?;
                let eval = t.evaluate.as_ref().expect("checked");
                crate::jobs::finetune::evaluate(eval, self.filter.as_ref(), &lora, &self.common, &ctx)
            }
            _ => return Err(Error::Invalid(format!("{}: no `{job}` job in this recipe", self.file.display()))),
        };
        r.map_err(|e| self.locate_field(e))
    }

    /// Points an `Error::Field` at its field's line (or, when the recipe does
    /// not write that field, at its section); other errors pass unchanged.
    pub fn locate_field(&self, e: Error) -> Error {
        let Error::Field { field, message } = e else { return e };
        let section = field.split('.').next().unwrap_or("");
        // A job's verifiers may come from the shared `verify:`.
        let shared = field.ends_with(".verify").then(|| self.locations.value_of("verify")).flatten();
        let at = self
            .locations
            .value_of(&field)
            .or(shared)
            .or_else(|| self.locations.of(section))
            .unwrap_or(Loc { line: 1, column: 1 });
        located(&self.file, at, &field, &message)
    }

    /// Attaches the location of `field` to an error about it.
    fn at_field<T>(&self, field: &str, r: Result<T>) -> Result<T> {
        r.map_err(|e| {
            let e = match e {
                Error::Field { field: f, message } if f == field => Error::Invalid(message),
                Error::Field { .. } => return self.locate_field(e),
                e => e,
            };
            let at =
                self.locations.value_of(field).or_else(|| self.locations.of(field.split('.').next().unwrap_or("")));
            located(&self.file, at.unwrap_or(Loc { line: 1, column: 1 }), field, &strip_field(&error_text(&e), field))
        })
    }
}

/// An error's message without the `invalid argument: ` its Display adds (the
/// location line already says it is about the recipe).
fn error_text(e: &Error) -> String {
    match e {
        Error::Invalid(s) => s.clone(),
        other => other.to_string(),
    }
}

/// `, held-out verifiers a, b` for a job's verifiers.
fn verify_note(verify: &[String]) -> String {
    if verify.is_empty() {
        String::new()
    } else {
        format!(", held-out verifiers {}", verify.join(", "))
    }
}

/// Refuses a folder that holds no finished, whole result of `job` (a run
/// without `--shard`, or a merge): what a later stage reads.
pub fn finished_result(dir: &Path, job: &str) -> Result<()> {
    let plan = dir.join(crate::jobs::runner::PLAN_FILE);
    let not_yet = |why: &str| {
        Error::Invalid(format!(
            "{}: {why}; run the {job} stage first (after a sharded one, `orchestrate merge --recipe RECIPE --job {job}`)",
            dir.display()
        ))
    };
    if !plan.is_file() {
        return Err(not_yet(&format!("no {job} result yet (no {})", crate::jobs::runner::PLAN_FILE)));
    }
    let v: serde_json::Value = crate::error::read_json(&plan)?;
    if v["job"] != job {
        return Err(not_yet(&format!("holds a `{}` run, not a {job} run", v["job"].as_str().unwrap_or("?"))));
    }
    if v["shard"]["count"].as_u64() != Some(1) {
        return Err(not_yet(&format!("holds shard {}/{} only, not the whole result", v["shard"]["index"], v["shard"]["count"])));
    }
    Ok(())
}

/// Whether a filter output folder's kept set is empty.
fn kept_nothing(filter_out: &Path) -> Result<bool> {
    let meta = filter_out.join(filter::TRAIN_DIR).join("metadata.jsonl");
    match std::fs::read_to_string(&meta) {
        Ok(text) => Ok(text.lines().all(|l| l.trim().is_empty())),
        Err(e) => Err(Error::io(&meta, e)),
    }
}

/// `output/job`, or `output/job/shard-i-of-n` for one shard of several.
pub fn job_dir(output: &Path, job: &str, shard: Shard) -> PathBuf {
    let dir = output.join(job);
    if shard.count > 1 {
        dir.join(format!("shard-{}-of-{}", shard.index, shard.count))
    } else {
        dir
    }
}

fn located(file: &Path, at: Loc, field: &str, msg: &str) -> Error {
    let message = if field.is_empty() { msg.to_string() } else { format!("{field}: {msg}") };
    Error::Recipe { path: file.to_path_buf(), line: at.line, column: at.column, field: field.to_string(), message }
}

fn resolve(dir: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        clean(&dir.join(p))
    }
}

/// `recipes/../prompts/x.txt` → `prompts/x.txt`: drops `.` and folds `dir/..`
/// as written (messages then show the path a user would type).
fn clean(p: &Path) -> PathBuf {
    use std::path::Component;
    let mut out: Vec<Component> = Vec::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir if matches!(out.last(), Some(Component::Normal(_))) => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    if out.is_empty() {
        PathBuf::from(".")
    } else {
        out.iter().collect()
    }
}

/// A model is a folder (relative to the recipe) when it is one there or does
/// not read like a repo id; an `ORG/NAME[@REV]` that is no folder there stays
/// a repo id for the HF cache.
fn resolve_model_spec(dir: &Path, spec: &str) -> String {
    let p = Path::new(spec);
    if p.is_absolute() {
        return spec.to_string();
    }
    let local = clean(&dir.join(p));
    let file_like = crate::diffusion::single_file::has_checkpoint_extension(p);
    let repo_like = spec.matches('/').count() == 1 && !spec.starts_with('.') && !local.exists() && !file_like;
    if repo_like {
        spec.to_string()
    } else {
        local.to_string_lossy().into_owned()
    }
}

/// Lowercase, `mask-threshold` → `mask_threshold` (hyphens inside words only,
/// so `--height` keeps its dashes and still reads as the word `height`).
fn normalize(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    chars
        .iter()
        .enumerate()
        .map(|(i, &c)| {
            let word = |j: Option<&char>| j.is_some_and(|c| c.is_alphanumeric());
            if c == '-' && i > 0 && word(chars.get(i - 1)) && word(chars.get(i + 1)) {
                '_'
            } else {
                c.to_ascii_lowercase()
            }
        })
        .collect()
}

/// Byte position of `word` in `text` as a whole word (`true`), else as the
/// last part of an `_`-joined one (`false`: `every` in `--guide_every`); never
/// inside a word (`threshold` is not in `thresholds`).
fn find_word(text: &str, word: &str) -> Option<(usize, bool)> {
    let is_word = |c: char| c.is_alphanumeric() || c == '_';
    let mut suffix = None;
    let mut from = 0;
    while let Some(i) = text[from..].find(word) {
        let start = from + i;
        let end = start + word.len();
        let before = text[..start].chars().next_back();
        let after = text[end..].chars().next().is_none_or(|c| !is_word(c));
        if after && before.is_none_or(|c| !is_word(c)) {
            return Some((start, true));
        }
        if after && before == Some('_') && suffix.is_none() {
            suffix = Some((start, false));
        }
        from = start + word.len().max(1);
    }
    suffix
}

/// `filter.threshold 1.5: must be in [0, 1]` → `1.5: must be in [0, 1]` when
/// the field is `filter.threshold` (the location line already names it);
/// likewise a leading `--flag `.
fn strip_field(text: &str, field: &str) -> String {
    let leaf = field.rsplit('.').next().unwrap_or(field);
    for prefix in [field.to_string(), format!("--{}", leaf.replace('_', "-")), format!("--{leaf}")] {
        if let Some(rest) = text.strip_prefix(prefix.as_str()) {
            let rest = rest.trim_start_matches([' ', ':']);
            if !rest.is_empty() {
                return rest.to_string();
            }
        }
    }
    text.to_string()
}

/// The generator's native image size: UNet `sample_size` times the VAE's
/// downsampling factor, diffusers' default for `height`/`width`.
pub fn native_size(source: &PipelineSource) -> Result<(i64, i64)> {
    let info = check_generator_source(source)?;
    info.native_size.ok_or_else(|| {
        Error::Invalid(format!(
            "{}: the UNet config has no sample_size, so there is no default image size: set sampling.height and sampling.width",
            info.root.display()
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_and_flags_are_found_whole() {
        let n = normalize("--mask-threshold 1.5: must be in [0, 1]");
        assert_eq!(find_word(&n, "mask_threshold"), Some((2, true)));
        assert_eq!(find_word(&n, "threshold"), Some((7, false)));
        assert_eq!(find_word(&n, "mask"), None);
        assert_eq!(find_word(&normalize("--height 12: must be"), "height"), Some((2, true)));
        assert_eq!(find_word(&normalize("--guide-every 0: must be"), "every"), Some((8, false)));
        assert_eq!(find_word("thresholds", "threshold"), None);
        assert_eq!(
            strip_field("filter.threshold 1.5: must be in [0, 1]", "filter.threshold"),
            "1.5: must be in [0, 1]"
        );
        assert_eq!(strip_field("--height 12: bad", "sampling.height"), "12: bad");
    }

    #[test]
    fn model_specs_resolve_against_the_recipe_folder() {
        let d = Path::new("/r");
        assert_eq!(resolve_model_spec(d, "org/name"), "org/name");
        assert_eq!(resolve_model_spec(d, "../models/x"), "/models/x");
        assert_eq!(resolve_model_spec(Path::new("recipes"), "../models/x"), "models/x");
        assert_eq!(clean(Path::new("a/./b/../../../c")), Path::new("../c"));
        assert_eq!(resolve_model_spec(d, "a/b/c"), "/r/a/b/c");
        assert_eq!(resolve_model_spec(d, "/abs/x"), "/abs/x");
    }
}
