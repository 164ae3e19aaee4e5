//! The pieces every job stands on: prompt lists, shards, the manifest's
//! durability rules, and the stage overlap's error handling.
use orchestrate::jobs::manifest::Manifest;
use orchestrate::jobs::prompts::read_prompts;
use orchestrate::jobs::stages::overlap;
use orchestrate::jobs::Shard;
use std::io::Write;

#[test]
fn prompts_from_text_and_jsonl() {
    let tmp = tempfile::tempdir().unwrap();
    let txt = tmp.path().join("p.txt");
    std::fs::write(&txt, "a cat\n\n# comment\n  a dog  \n").unwrap();
    let items = read_prompts(&txt).unwrap();
    assert_eq!(items.len(), 2);
    assert_eq!((items[1].prompt.as_str(), items[1].index), ("a dog", 1));
    assert!(items[1].id.starts_with("a-dog-") && items[1].id.len() == "a-dog-".len() + 8, "{}", items[1].id);

    let jsonl = tmp.path().join("p.jsonl");
    std::fs::write(&jsonl, "{\"prompt\": \"x\", \"id\": \"cat-1\"}\n{\"prompt\": \"y\", \"id\": 7}\n{\"prompt\": \"z\"}\n").unwrap();
    let ids: Vec<String> = read_prompts(&jsonl).unwrap().into_iter().map(|p| p.id).collect();
    assert_eq!(ids[..2], ["cat-1", "7"]);
    assert_eq!(ids[2], orchestrate::jobs::prompts::content_id("z"));

    std::fs::write(&jsonl, "{\"prompt\": \"x\", \"id\": \"a\"}\n{\"prompt\": \"y\", \"id\": \"a\"}\n").unwrap();
    let err = read_prompts(&jsonl).unwrap_err().to_string();
    assert!(err.contains("p.jsonl:2") && err.contains("duplicate"), "{err}");
    std::fs::write(&jsonl, "{\"text\": \"x\"}\n").unwrap();
    let err = read_prompts(&jsonl).unwrap_err().to_string();
    assert!(err.contains("p.jsonl:1") && err.contains("prompt"), "{err}");
    std::fs::write(&jsonl, "{\"prompt\": \"x\", \"id\": \"../evil\"}\n").unwrap();
    assert!(read_prompts(&jsonl).unwrap_err().to_string().contains("../evil"));
    let err = read_prompts(&tmp.path().join("none.txt")).unwrap_err().to_string();
    assert!(err.contains("none.txt"), "{err}");
}

/// Finding 1 of the runner issue: an id must not depend on the prompt's
/// position, or inserting a line re-labels every prompt after it.
#[test]
fn ids_follow_the_text_not_the_position() {
    let tmp = tempfile::tempdir().unwrap();
    let txt = tmp.path().join("p.txt");
    std::fs::write(&txt, "a cat\na dog\na cat\n").unwrap();
    let before: Vec<(String, String)> = read_prompts(&txt).unwrap().into_iter().map(|p| (p.id, p.prompt)).collect();
    assert_eq!(before[2].0, format!("{}-2", before[0].0), "a repeated prompt gets -2");
    std::fs::write(&txt, "a new first line\na cat\na dog\na cat\n").unwrap();
    let after: Vec<(String, String)> = read_prompts(&txt).unwrap().into_iter().map(|p| (p.id, p.prompt)).collect();
    assert_eq!(after[1..], before[..]);
    assert!(!before.iter().any(|b| b.0 == after[0].0));
    // Non-ASCII prompts still get a usable id; the hash tells them apart.
    let a = orchestrate::jobs::prompts::content_id("猫");
    let b = orchestrate::jobs::prompts::content_id("犬");
    assert!(a.starts_with("p-") && b.starts_with("p-") && a != b, "{a} {b}");
}

/// Finding 10: a UTF-8 byte-order mark is not part of the first prompt; an
/// endless or huge file is refused, not read without bound; a 300-character
/// id (it names files) is refused while reading the list.
#[test]
fn bom_size_and_id_length() {
    let tmp = tempfile::tempdir().unwrap();
    let txt = tmp.path().join("p.txt");
    std::fs::write(&txt, "\u{feff}a cat\n").unwrap();
    assert_eq!(read_prompts(&txt).unwrap()[0].prompt, "a cat");
    let err = read_prompts(std::path::Path::new("/dev/zero")).unwrap_err().to_string();
    assert!(err.contains("/dev/zero") && err.contains("larger"), "{err}");
    let jsonl = tmp.path().join("p.jsonl");
    std::fs::write(&jsonl, format!("{{\"prompt\": \"x\", \"id\": \"{}\"}}\n", "a".repeat(300))).unwrap();
    let err = read_prompts(&jsonl).unwrap_err().to_string();
    assert!(err.contains("p.jsonl:1") && err.contains("300 characters"), "{err}");
}

#[test]
fn shards_cover_every_prompt_once() {
    for n in 1..6 {
        let shards: Vec<Shard> = (0..n).map(|i| Shard::parse(&format!("{i}/{n}")).unwrap()).collect();
        for p in 0..50 {
            assert_eq!(shards.iter().filter(|s| s.takes(p)).count(), 1);
        }
    }
    for bad in ["3/3", "1", "a/b", "0/0", "-1/2"] {
        assert!(Shard::parse(bad).unwrap_err().to_string().contains(bad), "{bad}");
    }
}

#[test]
fn manifest_survives_a_torn_last_line_and_supersedes_redone_items() {
    let tmp = tempfile::tempdir().unwrap();
    {
        let mut m = Manifest::open(tmp.path()).unwrap();
        m.append("a", &serde_json::json!({"score": 0.1})).unwrap();
        m.append("b", &serde_json::json!({"score": 0.7})).unwrap();
        // A redone item: its new line replaces the old one; compaction keeps one line per id.
        m.append("a", &serde_json::json!({"score": 0.5})).unwrap();
        assert_eq!(m.records().len(), 2);
        assert_eq!(m.get("a").unwrap()["score"], 0.5);
        m.compact().unwrap();
    }
    // A kill in the middle of writing the third line.
    let path = tmp.path().join("manifest.jsonl");
    std::fs::OpenOptions::new().append(true).open(&path).unwrap().write_all(b"{\"id\": \"c\", \"sco").unwrap();
    let mut m = Manifest::open(tmp.path()).unwrap();
    assert!(m.is_done("a") && m.is_done("b") && !m.is_done("c"));
    assert_eq!(m.get("b").unwrap()["score"], 0.7);
    m.append("c", &serde_json::json!({"score": 0.9})).unwrap();
    drop(m);
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(text.lines().count(), 3, "{text}");
    assert!(text.lines().all(|l| serde_json::from_str::<serde_json::Value>(l).is_ok()), "{text}");

    std::fs::write(&path, "{\"id\": \"a\"}\nnot json\n").unwrap();
    let err = Manifest::open(tmp.path()).err().unwrap().to_string();
    assert!(err.contains("manifest.jsonl:2"), "{err}");
}

#[test]
fn overlap_keeps_order_and_stops_on_the_first_error() {
    let mut seen = Vec::new();
    overlap((0..20).collect(), 2, |i| Ok(i * 10), |p| {
        seen.push(p);
        Ok(())
    })
    .unwrap();
    assert_eq!(seen, (0..20).map(|i| i * 10).collect::<Vec<_>>());

    let mut produced = 0;
    let err = overlap((0..100).collect::<Vec<i32>>(), 1, |i| {
        produced += 1;
        Ok(i)
    }, |p| if p == 3 { Err(orchestrate::Error::Invalid("cpu stage failed at 3".into())) } else { Ok(()) })
    .unwrap_err();
    assert!(err.to_string().contains("failed at 3"));
    assert!(produced < 100, "the producer kept going after the consumer failed");

    let err = overlap((0..10).collect::<Vec<i32>>(), 1, |i| {
        if i == 2 { Err(orchestrate::Error::Invalid("gpu stage failed".into())) } else { Ok(i) }
    }, |_| Ok(()))
    .unwrap_err();
    assert!(err.to_string().contains("gpu stage failed"));
}
