//! A damaged state directory is detected, never read as a shorter history: one byte of the
//! store is flipped at a seeded random place, 50 times, and each time `stages status` and
//! `stages up --dry-run` either show exactly what the undamaged store shows, or refuse with a
//! message that says the state is damaged and names its directory. Never a shorter history
//! (which would make `stages up` send everything again).

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use baton_e2e::target::Target;

fn baton(dir: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_baton"))
        .args(args)
        .current_dir(dir)
        .env_remove("BATON_COORDINATOR")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn project(dir: &Path) {
    let mut stages = String::from("stages:\n");
    for (i, s) in ["net", "db", "app"].iter().enumerate() {
        stages.push_str(&format!(
            "  - name: {s}\n    config_path: {s}/config.yaml\n"
        ));
        if i > 0 {
            stages.push_str("    depends_on: [net]\n");
        }
        std::fs::create_dir_all(dir.join(s).join("migration")).unwrap();
        std::fs::write(dir.join(s).join("config.yaml"), "migrate_dir: migration\n").unwrap();
        for v in 1..=3 {
            std::fs::write(
                dir.join(s).join(format!("migration/{v:03}_step.yaml")),
                format!("up:\n  request:\n    method: PUT\n    url: '{{{{.api}}}}/{s}/{v}'\n"),
            )
            .unwrap();
        }
    }
    stages.push_str("global:\n  env:\n    api: http://127.0.0.1:9\n");
    std::fs::write(dir.join("stages.yaml"), stages).unwrap();
}

/// splitmix64.
fn next(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flipped_bytes_are_detected_not_read_as_less_history() {
    let root = baton_e2e::files::temp_dir("damage");
    let dir = root.join("project");
    project(&dir);
    let target = Target::start().await;
    target.answer_unscripted_like_a_cloud();
    let set = format!("api={}", target.url());
    // Two runs, so the log holds several transitions of each kind.
    let d = dir.clone();
    let s = set.clone();
    let (code, out, err) = tokio::task::spawn_blocking(move || {
        baton(&d, &["stages", "up", "--stage", "net", "--set", &s])
    })
    .await
    .unwrap();
    assert_eq!(code, 0, "{out}{err}");
    let d = dir.clone();
    let (code, out, err) =
        tokio::task::spawn_blocking(move || baton(&d, &["stages", "up", "--set", &set]))
            .await
            .unwrap();
    assert_eq!(code, 0, "{out}{err}");
    let state = dir.join(".baton");
    let status = |st: &Path| {
        baton(
            &dir,
            &["stages", "status", "--state-dir", &st.display().to_string()],
        )
    };
    let dry = |st: &Path| {
        baton(
            &dir,
            &[
                "stages",
                "up",
                "--dry-run",
                "--state-dir",
                &st.display().to_string(),
            ],
        )
    };
    let (code, want_status, err) = status(&state);
    assert_eq!(code, 0, "{err}");
    assert!(want_status.contains("applied  003_step"), "{want_status}");
    let (code, want_dry, err) = dry(&state);
    assert_eq!(code, 0, "{err}");
    let seed: u64 = std::env::var("BATON_DAMAGE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5EED_BA70);
    eprintln!("damage: seed {seed} (BATON_DAMAGE_SEED to replay)");
    let mut x = seed;
    let (mut refused, mut same) = (0, 0);
    for i in 0..50 {
        let copy: PathBuf = root.join(format!("state-{i}"));
        copy_dir(&state, &copy);
        let db = copy.join("db");
        let mut bytes = std::fs::read(&db).unwrap();
        // Flip a byte sled wrote (most of a segment is zero padding nothing reads).
        let written: Vec<usize> = (0..bytes.len()).filter(|&i| bytes[i] != 0).collect();
        let at = written[usize::try_from(next(&mut x) % written.len() as u64).unwrap()];
        let bit = 1u8 << (next(&mut x) % 8);
        bytes[at] ^= bit;
        std::fs::write(&db, &bytes).unwrap();
        for (what, (code, out, err), want) in [
            ("stages status", status(&copy), &want_status),
            ("stages up --dry-run", dry(&copy), &want_dry),
        ] {
            if code == 0 {
                assert_eq!(
                    &out, want,
                    "flip {i} (byte {at}, seed {seed}): `{what}` showed another history instead of refusing"
                );
                same += 1;
            } else {
                assert!(
                    err.contains("is damaged") && err.contains(&copy.display().to_string()),
                    "flip {i} (byte {at}, seed {seed}): `{what}` failed without saying the state is damaged:\n{err}"
                );
                assert!(!err.contains("panicked"), "flip {i}: {err}");
                refused += 1;
            }
        }
        let _ = std::fs::remove_dir_all(&copy);
    }
    eprintln!("damage: {refused} refused, {same} unchanged (the flip hit bytes nothing reads)");
    assert!(refused > 0, "no flip was detected at all");
    let _ = std::fs::remove_dir_all(&root);
}
