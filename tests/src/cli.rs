//! Running the real `baton` binary from a test: off the async runtime (so servers the test
//! runs keep serving), without the caller's coordinator settings, and never for ever.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long one command may take before the test fails as hung.
const LIMIT: Duration = Duration::from_secs(120);

/// Runs `bin args` in `dir`; its exit code (-1 when killed by a signal) and its stdout then
/// stderr. `BATON_COORDINATOR`, `BATON_TOKEN` and `BATON_ENVIRONMENT` are removed from its
/// environment.
pub async fn run(bin: &Path, dir: &Path, args: &[&str]) -> (i32, String) {
    run_with_env(bin, dir, args, &[]).await
}

/// [`run`] with `env` added to the command's environment.
pub async fn run_with_env(
    bin: &Path,
    dir: &Path,
    args: &[&str],
    env: &[(&str, &str)],
) -> (i32, String) {
    let (bin, dir) = (bin.to_path_buf(), dir.to_path_buf());
    let args: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    tokio::task::spawn_blocking(move || {
        let mut child = Command::new(&bin)
            .args(&args)
            .current_dir(&dir)
            .env_remove("BATON_COORDINATOR")
            .env_remove("BATON_TOKEN")
            .env_remove("BATON_ENVIRONMENT")
            .envs(env)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the binary starts");
        // Drain both pipes while waiting, so a chatty command never blocks on a full pipe.
        let mut stdout = child.stdout.take().expect("piped stdout");
        let mut stderr = child.stderr.take().expect("piped stderr");
        let out = std::thread::spawn(move || {
            let mut s = Vec::new();
            let _ = std::io::Read::read_to_end(&mut stdout, &mut s);
            s
        });
        let err = std::thread::spawn(move || {
            let mut s = Vec::new();
            let _ = std::io::Read::read_to_end(&mut stderr, &mut s);
            s
        });
        let deadline = Instant::now() + LIMIT;
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("{} {args:?} ran for more than {LIMIT:?}", bin.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.join().unwrap_or_default()),
            String::from_utf8_lossy(&err.join().unwrap_or_default())
        );
        (status.code().unwrap_or(-1), text)
    })
    .await
    .expect("the command's task")
}
