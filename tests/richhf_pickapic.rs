//! Pick-a-Pic images and prompts: the parquet shards written by pyarrow in
//! Pick-a-Pic's schema (tests/fixtures/pickapic/make_fixtures.py) against the
//! image bytes and captions the script recorded in expected.json.
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use orchestrate::error::Error;
use orchestrate::richhf::pickapic::{
    extract_from_parquet, find_parquet_shards, open_images, uid_of, ExtractReport, ImageFolder,
};

#[derive(serde::Deserialize)]
struct Expected {
    index: usize,
    caption: String,
    sha256: String,
    ext: String,
    width: u32,
    height: u32,
    colour: [u8; 3],
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pickapic")
}

fn expected() -> BTreeMap<String, Expected> {
    let text = std::fs::read_to_string(fixtures().join("expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// The uid of fixture image `index`.
fn uid(index: usize) -> String {
    expected().into_iter().find(|(_, e)| e.index == index).unwrap().0
}

fn shards() -> Vec<PathBuf> {
    find_parquet_shards(&fixtures().join("shards")).unwrap()
}

fn set(uids: &[String]) -> HashSet<String> {
    uids.iter().cloned().collect()
}

/// sha256, written out (FIPS 180-4) so the test needs no crate for it.
fn sha256(data: &[u8]) -> String {
    const K: [u32; 64] = [
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
        0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
        0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
        0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
        0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
        0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
        0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
    ];
    let mut h: [u32; 8] =
        [0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19];
    let mut msg = data.to_vec();
    msg.push(0x80);
    while msg.len() % 64 != 56 {
        msg.push(0);
    }
    msg.extend_from_slice(&((data.len() as u64) * 8).to_be_bytes());
    for chunk in msg.chunks(64) {
        let mut w = [0u32; 64];
        for i in 0..16 {
            w[i] = u32::from_be_bytes(chunk[4 * i..4 * i + 4].try_into().unwrap());
        }
        for i in 16..64 {
            let s0 = w[i - 15].rotate_right(7) ^ w[i - 15].rotate_right(18) ^ (w[i - 15] >> 3);
            let s1 = w[i - 2].rotate_right(17) ^ w[i - 2].rotate_right(19) ^ (w[i - 2] >> 10);
            w[i] = w[i - 16].wrapping_add(s0).wrapping_add(w[i - 7]).wrapping_add(s1);
        }
        let mut v = h;
        for i in 0..64 {
            let s1 = v[4].rotate_right(6) ^ v[4].rotate_right(11) ^ v[4].rotate_right(25);
            let ch = (v[4] & v[5]) ^ (!v[4] & v[6]);
            let t1 = v[7].wrapping_add(s1).wrapping_add(ch).wrapping_add(K[i]).wrapping_add(w[i]);
            let s0 = v[0].rotate_right(2) ^ v[0].rotate_right(13) ^ v[0].rotate_right(22);
            let maj = (v[0] & v[1]) ^ (v[0] & v[2]) ^ (v[1] & v[2]);
            let t2 = s0.wrapping_add(maj);
            v = [t1.wrapping_add(t2), v[0], v[1], v[2], v[3].wrapping_add(t1), v[4], v[5], v[6]];
        }
        for (a, b) in h.iter_mut().zip(v) {
            *a = a.wrapping_add(b);
        }
    }
    h.iter().map(|x| format!("{x:08x}")).collect()
}

#[test]
fn sha256_matches_known_digests() {
    assert_eq!(sha256(b""), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    assert_eq!(sha256(b"abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
}

/// Every image listed in `dir` is the fixture's, byte for byte, with its caption.
fn assert_extracted(dir: &Path, uids: &[String]) {
    let exp = expected();
    let folder = ImageFolder::open(dir).unwrap();
    assert_eq!(folder.len(), uids.len());
    for u in uids {
        let e = &exp[u];
        let entry = folder.get(u).unwrap_or_else(|| panic!("{u} not listed"));
        assert_eq!(entry.prompt, e.caption, "{u}");
        assert_eq!(entry.path, dir.join(format!("{u}.{}", e.ext)));
        assert_eq!(sha256(&std::fs::read(&entry.path).unwrap()), e.sha256, "{u}");
    }
    assert!(folder.missing_files().is_empty());
}

#[test]
fn finds_shards_recursively_in_order() {
    let root = fixtures().join("shards");
    assert_eq!(
        shards(),
        vec![root.join("data/train-00001-of-00002.parquet"), root.join("train-00000-of-00002.parquet")]
    );
}

#[test]
fn extracts_wanted_images_byte_for_byte_and_reports_missing() {
    // 3 on the image_1 side only in shard 1; 4 and 5 only in shard 1's second
    // row group (4 on the image_0 side, 5 on image_1); 6 in both shards; 0 and 1
    // in several rows of both; 2 and 7 are not wanted.
    let found: Vec<String> = [0, 1, 3, 4, 5, 6].map(uid).to_vec();
    let mut wanted = set(&found);
    wanted.insert("not-in-any-shard".into());
    let out = tempfile::tempdir().unwrap();
    let mut calls = Vec::new();
    let report = extract_from_parquet(&shards(), &wanted, out.path(), |i, n| calls.push((i, n))).unwrap();
    assert_eq!(
        report,
        ExtractReport { found: 6, already_present: 0, missing: vec!["not-in-any-shard".into()] }
    );
    assert_eq!(calls, vec![(1, 2), (2, 2)]);
    assert_extracted(out.path(), &found);
    // Only the images and the list: the temporary files were renamed.
    let mut names: Vec<String> = std::fs::read_dir(out.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    let exp = expected();
    let mut want: Vec<String> = found.iter().map(|u| format!("{u}.{}", exp[u].ext)).collect();
    want.push("prompts.jsonl".into());
    want.sort();
    assert_eq!(names, want);
}

#[test]
fn decodes_extracted_images() {
    // PNG, JPEG and (lossy, as Pick-a-Pic's) WebP.
    let uids: Vec<String> = [0, 1, 2, 3, 5].map(uid).to_vec();
    let out = tempfile::tempdir().unwrap();
    extract_from_parquet(&shards(), &set(&uids), out.path(), |_, _| {}).unwrap();
    let folder = ImageFolder::open(out.path()).unwrap();
    let exp = expected();
    for u in &uids {
        let e = &exp[u];
        let img = folder.load_image(u).unwrap();
        assert_eq!((img.width(), img.height()), (e.width, e.height), "{u}");
        // PNG is exact; JPEG and lossy WebP of a flat colour are within a few levels.
        let tol = if e.ext == "png" { 0 } else { 4 };
        for p in img.pixels() {
            for c in 0..3 {
                assert!(p.0[c].abs_diff(e.colour[c]) <= tol, "{u}: {:?} vs {:?}", p.0, e.colour);
            }
        }
    }
}

#[test]
fn stops_once_everything_is_found() {
    // Images 0 and 1 are both in the first shard read.
    let uids: Vec<String> = [0, 1].map(uid).to_vec();
    let out = tempfile::tempdir().unwrap();
    let mut calls = Vec::new();
    let report = extract_from_parquet(&shards(), &set(&uids), out.path(), |i, n| calls.push((i, n))).unwrap();
    assert_eq!(report, ExtractReport { found: 2, already_present: 0, missing: vec![] });
    assert_eq!(calls, vec![(1, 2)]);
    assert_extracted(out.path(), &uids);
}

#[test]
fn resumes_without_redoing_work() {
    let first: Vec<String> = [0, 4].map(uid).to_vec();
    let out = tempfile::tempdir().unwrap();
    let r1 = extract_from_parquet(&shards(), &set(&first), out.path(), |_, _| {}).unwrap();
    assert_eq!(r1.found, 2);
    let jsonl = out.path().join("prompts.jsonl");
    let before = std::fs::read(&jsonl).unwrap();

    // Everything already there: no shard is opened, nothing is written.
    let mut calls = 0;
    let r2 = extract_from_parquet(&shards(), &set(&first), out.path(), |_, _| calls += 1).unwrap();
    assert_eq!(r2, ExtractReport { found: 0, already_present: 2, missing: vec![] });
    assert_eq!(calls, 0);
    assert_eq!(std::fs::read(&jsonl).unwrap(), before);

    // More wanted: the old ones are counted, the new ones appended.
    let mut all = first.clone();
    all.push(uid(6));
    let r3 = extract_from_parquet(&shards(), &set(&all), out.path(), |_, _| {}).unwrap();
    assert_eq!(r3, ExtractReport { found: 1, already_present: 2, missing: vec![] });
    assert!(std::fs::read(&jsonl).unwrap().starts_with(&before));
    assert_extracted(out.path(), &all);

    // A listed image whose file went away is extracted again.
    let exp = expected();
    std::fs::remove_file(out.path().join(format!("{}.{}", all[1], exp[&all[1]].ext))).unwrap();
    let r4 = extract_from_parquet(&shards(), &set(&all), out.path(), |_, _| {}).unwrap();
    assert_eq!(r4, ExtractReport { found: 1, already_present: 2, missing: vec![] });
    assert_extracted(out.path(), &all);
}

#[test]
fn torn_last_line_is_dropped_and_redone() {
    let uids: Vec<String> = [0, 3].map(uid).to_vec();
    let out = tempfile::tempdir().unwrap();
    extract_from_parquet(&shards(), &set(&uids), out.path(), |_, _| {}).unwrap();
    let jsonl = out.path().join("prompts.jsonl");
    let text = std::fs::read_to_string(&jsonl).unwrap();
    assert_eq!(text.lines().count(), 2);
    // Cut the second line short, as an interrupted append would.
    let first_end = text.find('\n').unwrap() + 1;
    let torn = &text[..first_end + 20];
    std::fs::write(&jsonl, torn).unwrap();
    let folder = ImageFolder::open(out.path()).unwrap();
    assert_eq!(folder.len(), 1);
    let first: serde_json::Value = serde_json::from_str(&text[..first_end]).unwrap();
    let kept = uid_of(first["filename"].as_str().unwrap()).to_string();
    assert!(folder.get(&kept).is_some());

    let r = extract_from_parquet(&shards(), &set(&uids), out.path(), |_, _| {}).unwrap();
    assert_eq!(r, ExtractReport { found: 1, already_present: 1, missing: vec![] });
    let again = std::fs::read_to_string(&jsonl).unwrap();
    assert_eq!(again.lines().count(), 2, "{again}");
    assert!(again.ends_with('\n'));
    assert_extracted(out.path(), &uids);
}

#[test]
fn folder_source() {
    let dir = tempfile::tempdir().unwrap();
    let sub = dir.path().join("train");
    std::fs::create_dir(&sub).unwrap();
    let png = {
        let mut buf = std::io::Cursor::new(Vec::new());
        image::RgbImage::from_pixel(3, 2, image::Rgb([1, 2, 3]))
            .write_to(&mut buf, image::ImageFormat::Png)
            .unwrap();
        buf.into_inner()
    };
    // Content decides the format: PNG bytes under a .jpg name still decode.
    std::fs::write(sub.join("aa-1.jpg"), &png).unwrap();
    let lines = [
        r#"{"filename": "train/aa-1.jpg", "prompt": "a \"quoted\" ünïcödé prompt", "extra": 1}"#,
        "",
        r#"{"filename": "bb-2.png", "prompt": "its file is missing"}"#,
        r#"{"filename": "train/aa-1.jpg", "prompt": "a \"quoted\" ünïcödé prompt"}"#,
    ];
    let jsonl = dir.path().join("prompts.jsonl");
    std::fs::write(&jsonl, lines.join("\n") + "\n").unwrap();

    for path in [dir.path(), jsonl.as_path()] {
        let folder = ImageFolder::open(path).unwrap();
        assert_eq!(folder.len(), 2);
        assert_eq!(folder.uids().collect::<Vec<_>>(), ["aa-1", "bb-2"]);
        let e = folder.get(uid_of("train/aa-1.png")).unwrap();
        assert_eq!(e.prompt, "a \"quoted\" ünïcödé prompt");
        assert_eq!(e.path, sub.join("aa-1.jpg"));
        let img = folder.load_image("aa-1").unwrap();
        assert_eq!(img.dimensions(), (3, 2));
        assert_eq!(img.get_pixel(2, 1).0, [1, 2, 3]);
        assert_eq!(folder.missing_files(), ["bb-2"]);
        assert!(folder.get("bb-2").is_some());
        let err = folder.load_image("bb-2").unwrap_err();
        assert!(err.to_string().contains("bb-2.png"), "{err}");
        let err = folder.load_image("zz").unwrap_err();
        assert!(err.to_string().contains("zz") && err.to_string().contains("prompts.jsonl"), "{err}");
    }

    // open_images takes the folder as it is, whatever is wanted.
    let cache = tempfile::tempdir().unwrap();
    let (folder, report) = open_images(dir.path(), cache.path(), &set(&["aa-1".into()])).unwrap();
    assert!(report.is_none());
    assert_eq!(folder.len(), 2);
    assert_eq!(std::fs::read_dir(cache.path()).unwrap().count(), 0);
}

#[test]
fn bad_jsonl_lines_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let jsonl = dir.path().join("prompts.jsonl");
    let ok = r#"{"filename": "a.png", "prompt": "p"}"#;
    for (body, line, what) in [
        (format!("{ok}\n{{not json\n{ok}\n"), 1, "line 2"),
        (format!("{ok}\n{{\"filename\": \"b.png\"}}\n"), 1, "prompt"),
        (format!("{ok}\n{{\"filename\": \"x/a.jpg\", \"prompt\": \"p\"}}\n"), 1, "different file"),
        (format!("{ok}\n\n{{\"filename\": \"a.png\", \"prompt\": \"q\"}}\n"), 2, "different prompt"),
    ] {
        std::fs::write(&jsonl, &body).unwrap();
        let err = ImageFolder::open(dir.path()).unwrap_err();
        let Error::Data { path, record, reason } = &err else { panic!("{err}") };
        assert_eq!(path, &jsonl);
        assert_eq!(*record, Some(line), "{err}");
        assert!(reason.contains(what), "{err}");
    }
    // A bad line is only forgiven at the very end, without its newline.
    std::fs::write(&jsonl, format!("{ok}\n{{\"filename\": \"b.p")).unwrap();
    assert_eq!(ImageFolder::open(dir.path()).unwrap().len(), 1);
    std::fs::write(&jsonl, format!("{ok}\n{{\"filename\": \"b.p\n")).unwrap();
    assert!(ImageFolder::open(dir.path()).is_err());
    // A complete last line without its newline is kept.
    std::fs::write(&jsonl, format!("{ok}\n{{\"filename\": \"b.png\", \"prompt\": \"q\"}}")).unwrap();
    assert_eq!(ImageFolder::open(dir.path()).unwrap().len(), 2);
}

#[test]
fn open_images_extracts_shards_into_the_cache() {
    let uids: Vec<String> = [1, 5].map(uid).to_vec();
    let cache = tempfile::tempdir().unwrap();
    let cache_dir = cache.path().join("pickapic");
    let (folder, report) = open_images(&fixtures().join("shards"), &cache_dir, &set(&uids)).unwrap();
    assert_eq!(report, Some(ExtractReport { found: 2, already_present: 0, missing: vec![] }));
    assert_eq!(folder.jsonl_path(), cache_dir.join("prompts.jsonl"));
    assert_extracted(&cache_dir, &uids);
    let (_, report) = open_images(&fixtures().join("shards"), &cache_dir, &set(&uids)).unwrap();
    assert_eq!(report, Some(ExtractReport { found: 0, already_present: 2, missing: vec![] }));
}

#[test]
fn open_images_says_what_it_expected() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("notes.txt"), "hello").unwrap();
    let cache = tempfile::tempdir().unwrap();
    let err = open_images(dir.path(), cache.path(), &HashSet::new()).unwrap_err().to_string();
    assert!(err.contains("prompts.jsonl") && err.contains("parquet"), "{err}");
    let err = open_images(&dir.path().join("nope"), cache.path(), &HashSet::new()).unwrap_err().to_string();
    assert!(err.contains("nope"), "{err}");
}

#[test]
fn bad_shards_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("train-00000-of-00001.parquet");
    std::fs::write(&fake, b"this is not parquet at all, just some text").unwrap();
    let out = tempfile::tempdir().unwrap();
    let wanted = set(&[uid(0)]);
    let err = extract_from_parquet(std::slice::from_ref(&fake), &wanted, out.path(), |_, _| {}).unwrap_err();
    let Error::Data { path, .. } = &err else { panic!("{err}") };
    assert_eq!(path, &fake);
    assert!(err.to_string().contains("parquet"), "{err}");

    let no_jpg_1 = fixtures().join("bad/no_jpg_1.parquet");
    let err =
        extract_from_parquet(std::slice::from_ref(&no_jpg_1), &wanted, out.path(), |_, _| {}).unwrap_err();
    let Error::Data { path, reason, .. } = &err else { panic!("{err}") };
    assert_eq!(path, &no_jpg_1);
    assert!(reason.contains("`jpg_1`"), "{err}");

    // A uid that would name a file elsewhere is refused before anything is read.
    let err = extract_from_parquet(&shards(), &set(&["../x".into()]), out.path(), |_, _| {}).unwrap_err();
    assert!(err.to_string().contains("../x"), "{err}");
}

#[test]
fn fixture_exercises_page_skipping() {
    // The second shard stores one image per data page, so skipping unwanted
    // rows goes through whole-page skips, not only skips within a page.
    use parquet::column::page::PageReader;
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let file = std::fs::File::open(fixtures().join("shards/data/train-00001-of-00002.parquet")).unwrap();
    let reader = SerializedFileReader::new(file).unwrap();
    let schema = reader.metadata().file_metadata().schema_descr_ptr();
    let jpg_0 = (0..schema.num_columns()).find(|&i| schema.column(i).name() == "jpg_0").unwrap();
    let mut pages: Box<dyn PageReader> =
        reader.get_row_group(1).unwrap().get_column_page_reader(jpg_0).unwrap();
    let mut n = 0;
    while pages.get_next_page().unwrap().is_some() {
        n += 1;
    }
    assert_eq!(n, 3);
}

#[test]
fn reads_images_typed_as_hub_image_structs() {
    let uids: Vec<String> = [2, 3].map(uid).to_vec();
    let out = tempfile::tempdir().unwrap();
    let shards = find_parquet_shards(&fixtures().join("image_struct")).unwrap();
    let report = extract_from_parquet(&shards, &set(&uids), out.path(), |_, _| {}).unwrap();
    assert_eq!(report, ExtractReport { found: 2, already_present: 0, missing: vec![] });
    assert_extracted(out.path(), &uids);
}
