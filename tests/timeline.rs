//! The memory timeline looked at as a picture: the SVG rasterised by resvg, the HTML page
//! screenshotted by headless Chromium, each checked against what the traces say (which
//! categories are present, where the peak is and how high, where the capacity is crossed).
//!
//! The Chromium test skips when /usr/bin/chromium is missing, unless
//! `MEMPLAN_REQUIRE_CHROMIUM=1` (scripts/test.sh installs it and sets that).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use memplan::error::Kind;
use memplan::output::timeline::{
    self, Chart, CAPACITY_COLOR, HEIGHT, MEASURED_COLOR, OOM_COLOR, RESERVED_COLOR, WIDTH,
};
use memplan::trace::{
    Category, Event, Mark, MarkKind, Module, Op, Owner, Part, Section, Source, Trace,
};
use resvg::tiny_skia::Pixmap;

const MIB: u64 = 1 << 20;
const KIB: u64 = 1 << 10;

// ---------------------------------------------------------------------------------------
// Traces by hand.

struct Builder {
    source: Source,
    events: Vec<Event>,
    marks: Vec<Mark>,
    first_step: bool,
    next_id: u64,
}

impl Builder {
    fn new(source: Source) -> Builder {
        Builder {
            source,
            events: vec![],
            marks: vec![],
            first_step: true,
            next_id: 1,
        }
    }
    fn mark(&mut self, kind: MarkKind) {
        self.marks.push(Mark {
            at: self.events.len(),
            first_step: self.first_step,
            kind,
        });
    }
    fn begin(&mut self, section: Section) {
        self.mark(MarkKind::Begin { section, micro: 0 });
    }
    fn point(&mut self, phase: &str) {
        self.mark(MarkKind::Point {
            phase: phase.into(),
        });
    }
    fn push(&mut self, op: Op, id: u64, bytes: u64, category: Category) {
        self.events.push(Event {
            op,
            id,
            bytes,
            category,
            owner: Owner::new(Module::Layer(0), Part::Whole),
            stream: 0,
        });
    }
    fn alloc(&mut self, category: Category, bytes: u64) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.push(Op::Alloc, id, bytes, category);
        id
    }
    fn free(&mut self, id: u64) {
        let e = *self
            .events
            .iter()
            .rev()
            .find(|e| e.id == id && e.op == Op::Alloc)
            .expect("allocated");
        self.push(Op::Free, id, e.bytes, e.category);
    }
    fn finish(mut self) -> Trace {
        self.mark(MarkKind::End);
        Trace {
            source: self.source,
            stage: 0,
            rank: 0,
            capacity_bytes: None,
            events: self.events,
            marks: self.marks,
        }
    }
}

/// What one tensor of the predicted step is: category and bytes.
type Tensor = (Category, u64);

const MASTER: Tensor = (Category::MasterParams, 2 * MIB);
const ACT: Tensor = (Category::Activations, MIB);
const LOGITS: Tensor = (Category::Logits, 6 * MIB);
const STATES: Tensor = (Category::OptimizerStates, 8 * MIB);
const CAPACITY: u64 = 18 * MIB;
/// The predicted peak: master 4 + states 8 + activations 3 + logits 6 MiB, in the steady
/// step's backward.
const PEAK: u64 = 21 * MIB;
const PRESENT: [Category; 4] = [
    Category::MasterParams,
    Category::Activations,
    Category::Logits,
    Category::OptimizerStates,
];

/// Two steps, written once for the predicted trace (each tensor one allocation) and once
/// for the measured one (each tensor in `pieces` allocations of category "other", and a
/// short-lived 256 KiB temporary at the start of each section). The sections: setup, then
/// forward, backward and optimizer of the first step and of a steady one (whose optimizer
/// allocates nothing). The measured backward also has 16 short-lived 4 KiB temporaries right
/// after the logits. Returns the trace and, for the predicted one, the event index of the
/// steady backward's logits (the first event over the capacity).
fn step(source: Source, pieces: u64) -> (Trace, usize) {
    let mut b = Builder::new(source);
    let alloc = |b: &mut Builder, (c, bytes): Tensor| -> Vec<u64> {
        if pieces == 1 {
            return vec![b.alloc(c, bytes)];
        }
        (0..pieces)
            .map(|_| b.alloc(Category::Other, bytes / pieces))
            .collect()
    };
    let free = |b: &mut Builder, ids: Vec<u64>| ids.into_iter().for_each(|id| b.free(id));
    let section = |b: &mut Builder, s: Section| {
        b.begin(s);
        if pieces > 1 {
            let t = b.alloc(Category::Other, 256 * KIB);
            b.free(t);
        }
    };
    section(&mut b, Section::Setup);
    alloc(&mut b, MASTER);
    alloc(&mut b, MASTER);
    let mut oom = 0;
    for first in [true, false] {
        b.first_step = first;
        section(&mut b, Section::Forward);
        let acts: Vec<_> = (0..3).map(|_| alloc(&mut b, ACT)).collect();
        b.point("forward");
        section(&mut b, Section::Backward);
        if !first {
            oom = b.events.len();
        }
        let logits = alloc(&mut b, LOGITS);
        b.point("loss-backward");
        if pieces > 1 {
            // The loss's small temporaries: the measured peak holds a while.
            for _ in 0..16 {
                let t = b.alloc(Category::Other, 4 * KIB);
                b.free(t);
            }
        }
        free(&mut b, logits);
        acts.into_iter().for_each(|a| free(&mut b, a));
        b.point("backward-end");
        section(&mut b, Section::Optimizer);
        if first {
            alloc(&mut b, STATES);
        }
        b.point("optimizer");
    }
    (b.finish(), oom)
}

fn predicted() -> (Trace, usize) {
    step(Source::Predicted, 1)
}

fn measured() -> Trace {
    step(Source::Measured, 16).0
}

/// The allocator's reserved bytes, roughly: the running high-water mark in 2 MiB segments.
fn reserved(t: &Trace) -> Vec<u64> {
    let mut high = 0;
    t.running()
        .unwrap()
        .into_iter()
        .map(|v| {
            high = high.max(v.div_ceil(2 * MIB) * 2 * MIB);
            high
        })
        .collect()
}

fn breakdown(t: &Trace) -> Vec<(String, u64)> {
    let (_, at) = t.peak().unwrap();
    let cats = t.categories_at(at);
    Category::ALL
        .into_iter()
        .filter(|c| cats[c.index()] > 0)
        .map(|c| (c.name().to_string(), cats[c.index()]))
        .collect()
}

/// The x of the state after the first `a` events, by the layout's rule: every section (from
/// a Begin mark to the next Begin or End) one unit wide; within it, each of its n events
/// as wide as `1 + n * bytes² / Σ bytes²` (the sum over the section's events) is to the
/// sum of those weights, so large tensors (the logits) get room.
fn x_of(t: &Trace, a: usize) -> f64 {
    let bounds: Vec<usize> = t
        .marks
        .iter()
        .filter(|m| !matches!(m.kind, MarkKind::Point { .. }))
        .map(|m| m.at)
        .collect();
    for (i, w) in bounds.windows(2).enumerate() {
        if w[0] <= a && a <= w[1] && w[1] > w[0] {
            let events = &t.events[w[0]..w[1]];
            let n = events.len() as f64;
            let squares: Vec<f64> = events.iter().map(|e| (e.bytes as f64).powi(2)).collect();
            let sum: f64 = squares.iter().sum();
            let weight = |sq: &f64| 1.0 + if sum > 0.0 { n * sq / sum } else { 0.0 };
            let before: f64 = squares[..a - w[0]].iter().map(weight).sum();
            let all: f64 = squares.iter().map(weight).sum();
            return i as f64 + before / all;
        }
    }
    panic!("state {a} is in no section with events");
}

/// The middle of the stretch where the state after the first `a` events is drawn.
fn mid_x(t: &Trace, a: usize) -> f64 {
    (x_of(t, a) + x_of(t, a + 1)) / 2.0
}

fn sections(t: &Trace) -> f64 {
    t.marks
        .iter()
        .filter(|m| matches!(m.kind, MarkKind::Begin { .. }))
        .count() as f64
}

// ---------------------------------------------------------------------------------------
// Looking at pictures.

type Rgb = (u8, u8, u8);

struct Picture {
    w: usize,
    h: usize,
    px: Vec<Rgb>,
}

impl Picture {
    fn new(p: &Pixmap) -> Picture {
        // Opaque pictures: premultiplied equals straight.
        let px = p
            .pixels()
            .iter()
            .map(|c| {
                assert_eq!(c.alpha(), 255, "the picture has transparent pixels");
                (c.red(), c.green(), c.blue())
            })
            .collect();
        Picture {
            w: p.width() as usize,
            h: p.height() as usize,
            px,
        }
    }
    fn at(&self, x: usize, y: usize) -> Rgb {
        self.px[y * self.w + x]
    }
    fn count(&self, c: Rgb) -> usize {
        self.px.iter().filter(|&&p| near(p, c)).count()
    }
    /// Pixels of colour `c` whose 3 x 3 neighbourhood is all `c`: fills, not the
    /// antialiased edges of text (which hold every grey, "other"'s included).
    fn solid(&self, c: Rgb) -> usize {
        let mut n = 0;
        for y in 1..self.h - 1 {
            for x in 1..self.w - 1 {
                n += usize::from(
                    (y - 1..=y + 1).all(|v| (x - 1..=x + 1).all(|u| near(self.at(u, v), c))),
                );
            }
        }
        n
    }
    /// Whether a pixel has the colour of a category the predicted trace holds.
    fn category_at(&self, x: usize, y: usize) -> bool {
        let p = self.at(x, y);
        PRESENT.iter().any(|&c| near(p, timeline::color(c)))
    }
    /// Top and bottom rows of the present categories' colours in column x.
    fn stack_extent(&self, x: usize) -> Option<(usize, usize)> {
        let rows: Vec<usize> = (0..self.h).filter(|&y| self.category_at(x, y)).collect();
        Some((*rows.first()?, *rows.last()?))
    }
    fn non_background_fraction(&self) -> f64 {
        let bg = self
            .px
            .iter()
            .filter(|&&p| near(p, (255, 255, 255)))
            .count();
        1.0 - bg as f64 / self.px.len() as f64
    }
}

fn near(a: Rgb, b: Rgb) -> bool {
    a.0.abs_diff(b.0) <= 3 && a.1.abs_diff(b.1) <= 3 && a.2.abs_diff(b.2) <= 3
}

/// Where the plot lies in a picture, found from the capacity line (it spans the whole step
/// at the capacity) and the bottom of the stacked areas (zero bytes).
struct Frame {
    left: f64,
    right: f64,
    /// Where zero bytes and the capacity are, in continuous rows.
    zero: f64,
    capacity_row: f64,
    x_end: f64,
}

impl Frame {
    fn find(p: &Picture, x_end: f64) -> Frame {
        // The capacity line: the row with the most capacity-coloured pixels.
        let (row, n) = (0..p.h)
            .map(|y| {
                (
                    y,
                    (0..p.w)
                        .filter(|&x| near(p.at(x, y), CAPACITY_COLOR))
                        .count(),
                )
            })
            .max_by_key(|&(_, n)| n)
            .unwrap();
        assert!(
            n > p.w / 2,
            "no capacity line: its longest row has {n} pixels"
        );
        let xs: Vec<usize> = (0..p.w)
            .filter(|&x| near(p.at(x, row), CAPACITY_COLOR))
            .collect();
        // The line is 2 px wide, centred on the edge between its two rows (row r covers
        // [r, r + 1] in the picture's continuous coordinates).
        let centre = if row + 1 < p.h && near(p.at(xs[xs.len() / 2], row + 1), CAPACITY_COLOR) {
            row as f64 + 1.0
        } else {
            row as f64
        };
        let zero = (xs[0]..=*xs.last().unwrap())
            .filter_map(|x| p.stack_extent(x))
            .map(|(_, bottom)| bottom)
            .max()
            .expect("no stacked area") as f64
            + 1.0;
        Frame {
            left: xs[0] as f64,
            right: *xs.last().unwrap() as f64,
            zero,
            capacity_row: centre,
            x_end,
        }
    }
    fn column(&self, x: f64) -> usize {
        (self.left + x / self.x_end * (self.right - self.left)).round() as usize
    }
    /// Bytes drawn at a row.
    fn bytes_at_row(&self, row: f64) -> f64 {
        (self.zero - row) / (self.zero - self.capacity_row) * CAPACITY as f64
    }
}

/// The checks both renderers must pass: the categories of the predicted trace and no
/// other, the capacity and the lines, the peak where and as high as the trace says.
fn check_picture(p: &Picture, what: &str) {
    let (pred, oom) = predicted();
    let frac = p.non_background_fraction();
    assert!(
        (0.05..0.6).contains(&frac),
        "{what}: {frac:.3} of the picture is not background"
    );
    for c in Category::ALL {
        let n = p.solid(timeline::color(c));
        if PRESENT.contains(&c) {
            assert!(n > 1500, "{what}: {} has only {n} pixels", c.name());
        } else {
            // A legend swatch alone would be some 200.
            assert!(n < 20, "{what}: {} (absent) has {n} pixels", c.name());
        }
    }
    for (name, c, min) in [
        ("capacity", CAPACITY_COLOR, 1000),
        ("measured", MEASURED_COLOR, 500),
        ("reserved", RESERVED_COLOR, 500),
        ("out of memory", OOM_COLOR, 500),
    ] {
        let n = p.count(c);
        assert!(n > min, "{what}: the {name} colour has only {n} pixels");
    }

    let f = Frame::find(p, sections(&pred));
    let (peak, peak_at) = pred.peak().unwrap();
    assert_eq!(peak, PEAK);
    let running = pred.running().unwrap();
    // The state after setup's first allocation (2 MiB), and the peak.
    let early = 1;
    let height = |x: f64| {
        let (top, _) = p.stack_extent(f.column(x)).expect("stack in column");
        f.bytes_at_row(top as f64)
    };
    let at_peak = height(mid_x(&pred, peak_at));
    let at_start = height(mid_x(&pred, early));
    let mib = |b: f64| b / MIB as f64;
    assert!(
        (at_peak - peak as f64).abs() < 0.04 * peak as f64,
        "{what}: the stack at the peak is {:.2} MiB high, the trace says {:.2}",
        mib(at_peak),
        mib(peak as f64)
    );
    assert!(
        (at_start - running[early - 1] as f64).abs() < 0.3 * MIB as f64,
        "{what}: the stack at the start is {:.2} MiB high, the trace says {:.2}",
        mib(at_start),
        mib(running[early - 1] as f64)
    );
    // Nowhere higher than at the peak (one pixel of antialiasing).
    let highest = (f.left as usize..=f.right as usize)
        .filter_map(|x| p.stack_extent(x))
        .map(|(top, _)| top)
        .min()
        .unwrap();
    let (peak_top, _) = p.stack_extent(f.column(mid_x(&pred, peak_at))).unwrap();
    assert!(peak_top <= highest + 1, "{what}: {peak_top} vs {highest}");

    // The out-of-memory line where the trace's event is.
    let oom_col = (f.left as usize..=f.right as usize)
        .max_by_key(|&x| (0..p.h).filter(|&y| near(p.at(x, y), OOM_COLOR)).count())
        .unwrap();
    let expected = f.column(x_of(&pred, oom + 1));
    assert!(
        oom_col.abs_diff(expected) <= 2,
        "{what}: out-of-memory line at column {oom_col}, expected {expected}"
    );

    // The measured line reaches the same peak, within the same section.
    let meas = measured();
    let (mpeak, _) = meas.peak().unwrap();
    let (top_row, top_col) = (f.left as usize..=f.right as usize)
        .flat_map(|x| (0..p.h).map(move |y| (y, x)))
        .filter(|&(y, x)| near(p.at(x, y), MEASURED_COLOR))
        .min()
        .expect("measured line");
    let measured_peak = f.bytes_at_row(top_row as f64 + 1.0);
    assert!(
        (measured_peak - mpeak as f64).abs() < 0.04 * mpeak as f64,
        "{what}: measured line peaks at {:.2} MiB, the trace at {:.2}",
        mib(measured_peak),
        mib(mpeak as f64)
    );
    let steady_backward = (f.column(5.0), f.column(6.0));
    assert!(
        (steady_backward.0..=steady_backward.1).contains(&top_col),
        "{what}: measured peak at column {top_col}, outside the steady backward {steady_backward:?}"
    );

    // The reserved line tops out at the trace's reserved high-water mark.
    let rmax = *reserved(&pred).iter().max().unwrap();
    let rtop = (f.left as usize..=f.right as usize)
        .flat_map(|x| (0..p.h).map(move |y| (y, x)))
        .filter(|&(y, x)| near(p.at(x, y), RESERVED_COLOR))
        .map(|(y, _)| y)
        .min()
        .unwrap();
    let drawn = f.bytes_at_row(rtop as f64 + 1.0);
    assert!(
        (drawn - rmax as f64).abs() < 0.04 * rmax as f64,
        "{what}: reserved line tops at {:.2} MiB, expected {:.2}",
        mib(drawn),
        mib(rmax as f64)
    );
}

/// The texts of an SVG's `<text>` elements, unescaped.
fn svg_texts(svg: &str) -> Vec<String> {
    svg.split("<text")
        .skip(1)
        .map(|t| {
            let body = &t[t.find('>').unwrap() + 1..t.find("</text>").unwrap()];
            body.trim()
                .replace("&lt;", "<")
                .replace("&gt;", ">")
                .replace("&quot;", "\"")
                .replace("&#39;", "'")
                .replace("&amp;", "&")
        })
        .collect()
}

fn full_chart<'a>(pred: &'a Trace, meas: &'a Trace, res: &'a [u64], oom: usize) -> Chart<'a> {
    Chart {
        title: "seed <8B> & 2 x 18 MiB".into(),
        predicted: pred,
        reserved: Some(res),
        measured: Some(meas),
        capacity_bytes: Some(CAPACITY),
        oom_at: Some(oom),
        breakdown: breakdown(pred),
    }
}

/// Keeps a picture in $MEMPLAN_TIMELINE_KEEP (a folder), when set, to look at.
fn keep(name: &str, bytes: &[u8]) {
    if let Some(dir) = std::env::var_os("MEMPLAN_TIMELINE_KEEP") {
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(Path::new(&dir).join(name), bytes).unwrap();
    }
}

fn rasterise(svg: &str) -> Picture {
    let mut opt = resvg::usvg::Options::default();
    // Text is drawn when the machine has fonts; the checks do not need it. fontdb's
    // sans-serif is Arial: take an installed sans-serif family instead, if there is one.
    let db = opt.fontdb_mut();
    db.load_system_fonts();
    let sans = db
        .faces()
        .flat_map(|f| f.families.iter().map(|(name, _)| name.clone()))
        .find(|name| name.contains("Sans") && !name.contains("Mono"));
    if let Some(sans) = sans {
        db.set_sans_serif_family(sans);
    }
    let tree = resvg::usvg::Tree::from_str(svg, &opt).expect("the SVG parses");
    let size = tree.size().to_int_size();
    assert_eq!((size.width(), size.height()), (WIDTH, HEIGHT));
    let mut pixmap = Pixmap::new(size.width(), size.height()).unwrap();
    pixmap.fill(resvg::tiny_skia::Color::WHITE);
    resvg::render(
        &tree,
        resvg::tiny_skia::Transform::identity(),
        &mut pixmap.as_mut(),
    );
    if let Ok(png) = pixmap.encode_png() {
        keep("resvg.png", &png);
    }
    Picture::new(&pixmap)
}

// ---------------------------------------------------------------------------------------
// Tests.

#[test]
fn svg_shows_the_present_categories_the_capacity_and_the_peak_where_the_trace_has_them() {
    let (pred, oom) = predicted();
    let meas = measured();
    assert!(meas.events.len() > 10 * pred.events.len());
    let res = reserved(&pred);
    let svg = timeline::svg(&full_chart(&pred, &meas, &res, oom)).unwrap();
    keep("timeline.svg", svg.as_bytes());
    check_picture(&rasterise(&svg), "resvg");
}

#[test]
fn the_layout_rule_gives_the_logits_of_the_steady_backward_room() {
    // The steady backward (section 5): logits 6 MiB alloc and free, three 1 MiB frees.
    // Σ bytes² = 75 MiB², n = 5: weights 3.4, 3.4, 1.0667 x 3, of 10.
    let (pred, oom) = predicted();
    let at: Vec<f64> = (oom..=oom + 5).map(|a| x_of(&pred, a)).collect();
    let want = [5.0, 5.34, 5.68, 5.68 + 0.32 / 3.0, 5.68 + 0.64 / 3.0, 6.0];
    for (got, want) in at.iter().zip(want) {
        assert!((got - want).abs() < 1e-9, "{at:?}");
    }
}

#[test]
fn svg_names_the_sections_the_present_categories_and_the_lines() {
    let (pred, oom) = predicted();
    let meas = measured();
    let res = reserved(&pred);
    let svg = timeline::svg(&full_chart(&pred, &meas, &res, oom)).unwrap();
    let texts = svg_texts(&svg);
    for text in [
        "seed <8B> & 2 x 18 MiB",
        "setup",
        "step 1 forward",
        "steady step",
        "forward",
        "backward",
        "optimizer",
        "capacity 18.00 MiB",
        "out of memory",
        "allocated (MiB)",
        "loss-backward",
        "backward-end",
        "reserved (simulated)",
        "measured allocated",
    ] {
        assert!(texts.iter().any(|t| t == text), "no {text:?} in {texts:?}");
    }
    // The legend: the categories the trace holds, and no other.
    for c in Category::ALL {
        let shown = texts.iter().any(|t| t == c.name());
        assert_eq!(shown, PRESENT.contains(&c), "legend entry {}", c.name());
    }
    // The measured trace has the same sections: nothing to note.
    assert!(!svg.contains("other sections"));
    assert!(svg.starts_with("<svg"));
}

#[test]
fn a_tiny_trace_reads_in_kib_and_a_large_one_in_gib() {
    let mut b = Builder::new(Source::Predicted);
    b.begin(Section::Forward);
    b.alloc(Category::Activations, 3000);
    let tiny = b.finish();
    let svg = |t: &Trace| {
        timeline::svg(&Chart {
            title: "t".into(),
            predicted: t,
            reserved: None,
            measured: None,
            capacity_bytes: None,
            oom_at: None,
            breakdown: vec![],
        })
        .unwrap()
    };
    assert!(svg(&tiny).contains("allocated (KiB)"));
    let mut b = Builder::new(Source::Predicted);
    b.begin(Section::Forward);
    b.alloc(Category::Activations, 40 << 30);
    assert!(svg(&b.finish()).contains("allocated (GiB)"));
}

#[test]
fn a_measured_trace_of_a_million_events_is_cut_to_a_small_picture_that_keeps_its_peak() {
    let (pred, _) = predicted();
    // One forward section: 500,000 tensors of 1-4 KiB allocated and freed in pairs, one of
    // 40 MiB in the middle: a peak one event wide among a million.
    let mut b = Builder::new(Source::Measured);
    b.begin(Section::Forward);
    for i in 0..500_000u64 {
        let id = b.alloc(Category::Other, KIB * (1 + i % 4));
        if i == 250_000 {
            let big = b.alloc(Category::Other, 40 * MIB);
            b.free(big);
        }
        b.free(id);
    }
    let meas = b.finish();
    assert!(meas.events.len() > 1_000_000);
    let (mpeak, _) = meas.peak().unwrap();
    let start = Instant::now();
    let svg = timeline::svg(&Chart {
        title: "a million events".into(),
        predicted: &pred,
        reserved: None,
        measured: Some(&meas),
        capacity_bytes: Some(CAPACITY),
        oom_at: None,
        breakdown: vec![],
    })
    .unwrap();
    let took = start.elapsed();
    assert!(svg.len() < 400_000, "SVG of {} bytes", svg.len());
    assert!(took < Duration::from_secs(20), "took {took:?}");
    // Its sections differ from the predicted trace's: said in the picture.
    assert!(svg.contains("other sections than the predicted one"));
    // The peak survives the cut: the measured line tops out at it.
    let p = rasterise(&svg);
    let f = Frame::find(&p, sections(&pred));
    let top = (f.left as usize..=f.right as usize)
        .flat_map(|x| (0..p.h).map(move |y| (y, x)))
        .filter(|&(y, x)| near(p.at(x, y), MEASURED_COLOR))
        .map(|(y, _)| y)
        .min()
        .expect("measured line");
    let drawn = f.bytes_at_row(top as f64 + 1.0);
    assert!(
        (drawn - mpeak as f64).abs() < 0.04 * mpeak as f64,
        "measured line tops at {:.2} MiB, its peak is {:.2} MiB",
        drawn / MIB as f64,
        mpeak as f64 / MIB as f64
    );
}

#[test]
fn inconsistent_input_is_an_error_not_a_panic() {
    let (pred, oom) = predicted();
    let chart = |predicted, reserved, oom_at| Chart {
        title: "x".into(),
        predicted,
        reserved,
        measured: None,
        capacity_bytes: None,
        oom_at,
        breakdown: vec![],
    };
    let e = timeline::svg(&chart(&pred, Some(&[1, 2, 3]), None)).unwrap_err();
    assert_eq!(e.kind(), Kind::Input);
    assert_eq!(e.field(), Some("reserved"));
    let e = timeline::svg(&chart(&pred, None, Some(pred.events.len()))).unwrap_err();
    assert_eq!(e.field(), Some("oom_at"));
    assert!(timeline::svg(&chart(&pred, None, Some(oom))).is_ok());

    // A free whose bytes differ from its allocation.
    let mut bad = pred.clone();
    let k = bad.events.iter().position(|e| e.op == Op::Free).unwrap();
    bad.events[k].bytes += 1;
    let e = timeline::html(&chart(&bad, None, None)).unwrap_err();
    assert_eq!(e.kind(), Kind::Input);
    assert!(e.to_string().contains(&format!("trace event {k}")), "{e}");

    // Marks out of order.
    let mut bad = pred.clone();
    bad.marks.swap(1, 2);
    let e = timeline::svg(&chart(&bad, None, None)).unwrap_err();
    assert_eq!(e.kind(), Kind::Input);
}

#[test]
fn html_is_self_contained_and_holds_the_breakdown_table() {
    let (pred, oom) = predicted();
    let meas = measured();
    let res = reserved(&pred);
    let page = timeline::html(&full_chart(&pred, &meas, &res, oom)).unwrap();
    assert!(page.starts_with("<!DOCTYPE html>"));
    assert!(page.contains("<title>seed &lt;8B&gt; &amp; 2 x 18 MiB</title>"));
    assert_eq!(page.matches("<svg").count(), 1);
    for banned in [
        "<script", "http://", "https://", "src=", "<link", "@import", "url(",
    ] {
        // The SVG's xmlns is the one URL allowed: a name, never fetched.
        let n = page.matches(banned).count();
        let xmlns = if banned == "http://" {
            page.matches("xmlns=\"http://").count()
        } else {
            0
        };
        assert_eq!(n, xmlns, "{banned:?} in the page");
    }
    // One row per non-zero category at the peak and the total: 4 + 8 + 3 + 6 MiB.
    for (name, bytes) in [
        ("master params", "4.00 MiB"),
        ("optimizer states", "8.00 MiB"),
        ("activations", "3.00 MiB"),
        ("logits", "6.00 MiB"),
    ] {
        assert!(
            page.contains(&format!("<tr><td>{name}</td><td class=\"n\">{bytes}</td>")),
            "no row for {name} ({bytes})"
        );
    }
    assert!(page.contains("<b>21.00 MiB</b>"));
}

#[test]
fn html_page_in_headless_chromium_shows_the_same_picture() {
    let (pred, oom) = predicted();
    let meas = measured();
    let res = reserved(&pred);
    let page = timeline::html(&full_chart(&pred, &meas, &res, oom)).unwrap();
    let Some(shot) = chromium_screenshot(&page) else {
        return;
    };
    assert_eq!((shot.w, shot.h), (1280, 1000));
    check_picture(&shot, "chromium");
}

// ---------------------------------------------------------------------------------------
// Headless Chromium.

const CHROMIUM: &str = "/usr/bin/chromium";

/// A scratch directory, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Scratch {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let dir =
            std::env::temp_dir().join(format!("memplan-timeline-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The page rendered by headless Chromium at 1280 x 1000, or None (skipped) when Chromium
/// is not installed and MEMPLAN_REQUIRE_CHROMIUM is not 1.
fn chromium_screenshot(page: &str) -> Option<Picture> {
    if !Path::new(CHROMIUM).exists() {
        if std::env::var("MEMPLAN_REQUIRE_CHROMIUM").as_deref() == Ok("1") {
            panic!("{CHROMIUM} is missing and MEMPLAN_REQUIRE_CHROMIUM=1");
        }
        eprintln!("skipped: {CHROMIUM} is missing (apt-get install chromium)");
        return None;
    }
    let dir = Scratch::new();
    let html = dir.0.join("timeline.html");
    let png = dir.0.join("shot.png");
    let log = dir.0.join("chromium.log");
    std::fs::write(&html, page).unwrap();
    let mut child = Command::new(CHROMIUM)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            "--force-color-profile=srgb",
            "--force-device-scale-factor=1",
            "--window-size=1280,1000",
        ])
        .arg(format!(
            "--user-data-dir={}",
            dir.0.join("profile").display()
        ))
        .arg(format!("--screenshot={}", png.display()))
        .arg(format!("file://{}", html.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("start chromium");
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "chromium ran over 120 s:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let bytes = std::fs::read(&png).unwrap_or_else(|e| {
        panic!(
            "no screenshot ({e}); chromium exited with {status}:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        )
    });
    keep("timeline.html", page.as_bytes());
    keep("chromium.png", &bytes);
    let pixmap = Pixmap::decode_png(&bytes).expect("chromium's PNG decodes");
    Some(Picture::new(&pixmap))
}
