//! The RichHF-18K TFRecord reader against files written by the official
//! protobuf runtime and TensorBoard's TFRecord writer
//! (tests/fixtures/richhf/make_fixtures.py), with maps decoded by PIL.
use orchestrate::richhf::record::{
    encode_record, read_at, read_index, read_split, RichHfFile, RichHfReader, RichHfRecord,
};
use orchestrate::richhf::tfrecord::{OnError, TfRecordWriter};
use serde_json::Value;
use std::path::{Path, PathBuf};

const SIZE: (usize, usize) = (512, 512);

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/richhf").join(name)
}

fn expected() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("expected.json")).unwrap()).unwrap()
}

fn u64s(v: &Value) -> Vec<u64> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect()
}

/// One record against its expected.json entry. JPEG decoders may differ by a
/// level or two (IDCT rounding), so JPEG maps get a tolerance; PNG maps and the
/// bilinear resize of a PNG map must match closely.
fn check_record(r: &RichHfRecord, e: &Value) {
    let name = e["filename"].as_str().unwrap();
    assert_eq!(r.filename, name);
    assert_eq!(r.uid(), e["uid"].as_str().unwrap());
    let scores: Vec<f32> =
        e["scores"].as_array().unwrap().iter().map(|s| s.as_f64().unwrap() as f32).collect();
    assert_eq!(r.scores.to_vec(), scores, "{name}: scores");
    let labels: Vec<u8> = e["labels"].as_array().unwrap().iter().map(|l| l.as_u64().unwrap() as u8).collect();
    assert_eq!(r.labels, labels, "{name}: labels");
    for (k, (map, em)) in r.heatmaps.iter().zip(e["maps"].as_array().unwrap()).enumerate() {
        assert_eq!((map.height, map.width), SIZE, "{name}: map {k} size");
        let jpeg = em["format"] == "JPEG";
        let (px_tol, sum_tol) = if jpeg { (2.0 / 255.0, 1e-4) } else { (1e-6, 1e-6) };
        for p in em["probes"].as_array().unwrap() {
            let (y, x, v) =
                (p[0].as_u64().unwrap() as usize, p[1].as_u64().unwrap() as usize, p[2].as_f64().unwrap());
            let got = map.data[y * SIZE.1 + x] as f64;
            assert!((got - v).abs() <= px_tol, "{name}: map {k} at ({y}, {x}): {got} vs {v}");
        }
        let sum: f64 = map.data.iter().map(|&v| v as f64).sum();
        let want = em["sum"].as_f64().unwrap();
        assert!((sum - want).abs() <= sum_tol * want.max(1.0), "{name}: map {k} sum {sum} vs {want}");
        if !jpeg {
            let nonzero = map.data.iter().filter(|&&v| v > 0.0).count() as u64;
            assert_eq!(nonzero, em["nonzero"].as_u64().unwrap(), "{name}: map {k} nonzero pixels");
        }
    }
}

#[test]
fn reads_the_release_format() {
    let exp = expected();
    let split = read_split(&fixture("good.tfrecord"), OnError::Stop, SIZE).unwrap();
    let recs = exp["records"].as_array().unwrap();
    assert_eq!(split.records.len(), recs.len());
    assert!(split.problems.is_empty(), "{:?}", split.problems);
    for (i, (r, e)) in split.records.iter().zip(recs).enumerate() {
        assert_eq!(r.index, i as u64);
        check_record(r, e);
    }
    // Only record 2 has a map of another size, and the warning names it.
    assert_eq!(split.warnings.len(), 1, "{:?}", split.warnings);
    let w = &split.warnings[0];
    assert!(w.contains("good.tfrecord record 2: artifact_map is 256x256, expected 512x512"), "{w}");
    assert!(recs[2]["resized"].as_bool().unwrap());

    // Streaming yields the same, and hands the warning over.
    let mut reader = RichHfReader::open(&fixture("good.tfrecord"), OnError::Skip, SIZE).unwrap();
    let streamed: Vec<RichHfRecord> = reader.by_ref().map(|r| r.unwrap()).collect();
    assert_eq!(streamed, split.records);
    assert_eq!(reader.take_warnings(), split.warnings);
    assert!(reader.warnings().is_empty() && reader.problems().is_empty());
}

#[test]
fn index_and_random_access() {
    let exp = expected();
    let path = fixture("good.tfrecord");
    let (index, problems) = read_index(&path, OnError::Stop).unwrap();
    assert!(problems.is_empty());
    assert_eq!(index.iter().map(|e| e.offset).collect::<Vec<_>>(), u64s(&exp["good"]["offsets"]));
    assert_eq!(index.iter().map(|e| e.len).collect::<Vec<_>>(), u64s(&exp["good"]["lens"]));
    let recs = exp["records"].as_array().unwrap();
    let mut file = RichHfFile::open(&path).unwrap();
    for entry in index.iter().rev() {
        assert_eq!(entry.filename, recs[entry.index as usize]["filename"].as_str().unwrap());
        let (r, warning) = file.read(entry, SIZE).unwrap();
        assert_eq!(r.index, entry.index);
        check_record(&r, &recs[entry.index as usize]);
        assert_eq!(warning.is_some(), entry.index == 2);
    }
    let (r, _) = read_at(&path, &index[1], SIZE).unwrap();
    check_record(&r, &recs[1]);

    // An index that no longer fits the file is refused, not misread.
    let mut stale = index[1].clone();
    stale.filename = "train/other.png".into();
    let e = file.read(&stale, SIZE).unwrap_err().to_string();
    assert!(e.contains("record 1: the index says `train/other.png`") && e.contains("stale index"), "{e}");
    let mut moved = index[1].clone();
    moved.offset += 1;
    let e = file.read(&moved, SIZE).unwrap_err().to_string();
    assert!(e.contains("record 1: bad length CRC"), "{e}");
    // Building the index checks the framing: a bad data CRC keeps record 1 out of it.
    let (index, problems) = read_index(&fixture("bad_data_crc.tfrecord"), OnError::Skip).unwrap();
    assert_eq!(index.iter().map(|e| e.index).collect::<Vec<_>>(), vec![0, 2, 3]);
    assert_eq!(problems.len(), 1);
    assert_eq!(problems[0].index, Some(1));
}

/// Which records a Skip read keeps, and the one problem; and that Stop fails
/// at that same record with `stop_says`.
fn check_damaged(
    name: &str,
    bad_index: u64,
    bad_offset: u64,
    read: &[u64],
    skip_says: &str,
    stop_says: &str,
) {
    let exp = expected();
    let recs = exp["records"].as_array().unwrap();
    let split = read_split(&fixture(name), OnError::Skip, SIZE).unwrap();
    assert_eq!(split.records.iter().map(|r| r.index).collect::<Vec<_>>(), read, "{name}");
    for r in &split.records {
        check_record(r, &recs[r.index as usize]);
    }
    assert_eq!(split.problems.len(), 1, "{name}: {:?}", split.problems);
    let p = &split.problems[0];
    assert_eq!((p.index, p.offset), (Some(bad_index), bad_offset), "{name}: {p:?}");
    assert!(p.reason.contains(skip_says), "{name}: {}", p.reason);

    let e = read_split(&fixture(name), OnError::Stop, SIZE).unwrap_err().to_string();
    assert!(e.contains(&format!("{name} record {bad_index}: {stop_says}")), "{e}");
    // Under Stop the streaming reader yields the good records before the damage, then the error.
    let items: Vec<_> = RichHfReader::open(&fixture(name), OnError::Stop, SIZE).unwrap().collect();
    assert_eq!(items.len() as u64, bad_index + 1, "{name}");
    assert!(items[..bad_index as usize].iter().all(|r| r.is_ok()));
    assert!(items[bad_index as usize].is_err());
}

#[test]
fn bad_data_crc() {
    let exp = expected();
    let b = &exp["bad_data_crc"];
    let (i, off) = (b["bad_index"].as_u64().unwrap(), b["bad_offset"].as_u64().unwrap());
    check_damaged(
        "bad_data_crc.tfrecord",
        i,
        off,
        &u64s(&b["read"]),
        "bad data CRC (stored 0x",
        "bad data CRC",
    );
}

#[test]
fn bad_length_crc_resynchronises() {
    let exp = expected();
    let b = &exp["bad_length"];
    let (i, off) = (b["bad_index"].as_u64().unwrap(), b["bad_offset"].as_u64().unwrap());
    let skipped = b["skipped"].as_u64().unwrap();
    let says = format!("skipped {skipped} bytes to the next valid record at byte offset {}", off + skipped);
    check_damaged("bad_length.tfrecord", i, off, &u64s(&b["read"]), &says, "bad length CRC (stored 0x");
}

#[test]
fn truncated_file() {
    let exp = expected();
    let b = &exp["truncated"];
    let (i, off) = (b["bad_index"].as_u64().unwrap(), b["bad_offset"].as_u64().unwrap());
    let left = b["data_left"].as_u64().unwrap();
    let lens = u64s(&exp["good"]["lens"]);
    let says = format!("the header promises {} data bytes + 4 CRC bytes, {left} are left", lens[i as usize]);
    check_damaged("truncated.tfrecord", i, off, &u64s(&b["read"]), &says, "truncated file");
}

#[test]
fn undecodable_records() {
    let exp = expected();
    let b = &exp["bad_content"];
    let recs = exp["records"].as_array().unwrap();
    let offsets = u64s(&b["offsets"]);
    let split = read_split(&fixture("bad_content.tfrecord"), OnError::Skip, SIZE).unwrap();
    let read: Vec<(u64, usize)> = b["read"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p[0].as_u64().unwrap(), p[1].as_u64().unwrap() as usize))
        .collect();
    assert_eq!(split.records.len(), read.len());
    for (r, &(index, which)) in split.records.iter().zip(&read) {
        assert_eq!(r.index, index);
        check_record(r, &recs[which]);
    }
    let problems = b["problems"].as_array().unwrap();
    assert_eq!(split.problems.len(), problems.len(), "{:?}", split.problems);
    for (p, want) in split.problems.iter().zip(problems) {
        let i = want[0].as_u64().unwrap();
        assert_eq!((p.index, p.offset), (Some(i), offsets[i as usize]));
        assert!(p.reason.contains(want[1].as_str().unwrap()), "{}", p.reason);
    }
    let e = read_split(&fixture("bad_content.tfrecord"), OnError::Stop, SIZE).unwrap_err().to_string();
    assert!(e.contains("bad_content.tfrecord record 1: feature `overall_score` is missing"), "{e}");

    // The index decodes only `filename`: record 1 is in it and fails when loaded.
    let (index, problems) = read_index(&fixture("bad_content.tfrecord"), OnError::Skip).unwrap();
    assert_eq!(index.iter().map(|e| e.index).collect::<Vec<_>>(), vec![0, 1, 3]);
    assert_eq!(problems.len(), 1);
    assert_eq!(problems[0].index, Some(2));
    assert!(problems[0].reason.contains("not a tf.train.Example"), "{}", problems[0].reason);
    let e = read_at(&fixture("bad_content.tfrecord"), &index[1], SIZE).unwrap_err().to_string();
    assert!(e.contains("record 1: feature `overall_score` is missing"), "{e}");
    let e = read_index(&fixture("bad_content.tfrecord"), OnError::Stop).unwrap_err().to_string();
    assert!(e.contains("record 2: not a tf.train.Example"), "{e}");
}

/// Records written by `encode_record` read back as they were, through the file format.
#[test]
fn encode_record_round_trip() {
    let good = read_split(&fixture("good.tfrecord"), OnError::Stop, SIZE).unwrap().records;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("synthetic.tfrecord");
    let mut w = TfRecordWriter::create(&path).unwrap();
    for r in &good {
        w.write_record(&encode_record(r)).unwrap();
    }
    w.finish().unwrap();
    let back = read_split(&path, OnError::Stop, SIZE).unwrap();
    assert!(back.warnings.is_empty() && back.problems.is_empty());
    assert_eq!(back.records.len(), good.len());
    for (a, b) in good.iter().zip(&back.records) {
        assert_eq!((a.index, &a.filename, a.scores, &a.labels), (b.index, &b.filename, b.scores, &b.labels));
        for (ma, mb) in a.heatmaps.iter().zip(&b.heatmaps) {
            // Decoded maps are multiples of 1/255 and survive exactly; the resized
            // one is quantised to the nearest level.
            let tol = if a.index == 2 { 0.5 / 255.0 + 1e-6 } else { 0.0 };
            let worst = ma.data.iter().zip(&mb.data).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
            assert!(worst <= tol, "record {}: map differs by {worst}", a.index);
        }
    }
}
