//! Project files for tests: copying a bundled example, writing a file with its directories.

use std::path::Path;

/// Copies the directory `src` to `dst`, leaving out state directories (`.baton`).
pub fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).expect("create the copy's directory");
    for entry in std::fs::read_dir(src).expect("read the source directory") {
        let entry = entry.expect("a directory entry");
        let to = dst.join(entry.file_name());
        if entry.file_type().expect("a file type").is_dir() {
            if entry.file_name() != ".baton" {
                copy_dir(&entry.path(), &to);
            }
        } else {
            std::fs::copy(entry.path(), &to).expect("copy a file");
        }
    }
}

/// Writes `content` to `path`, creating its directories.
pub fn write(path: &Path, content: &str) {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).expect("create the file's directory");
    }
    std::fs::write(path, content).expect("write the file");
}

/// A fresh (emptied) directory under the system's temporary directory, named for the test
/// and this process.
pub fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("baton-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create the test's directory");
    dir
}

/// Every byte of every file under `dir`, concatenated (to look for what must not be there,
/// e.g. a secret in a state directory).
pub fn all_bytes(dir: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read the directory") {
        let entry = entry.expect("a directory entry");
        if entry.file_type().expect("a file type").is_dir() {
            out.extend(all_bytes(&entry.path()));
        } else {
            out.extend(std::fs::read(entry.path()).expect("read a file"));
        }
    }
    out
}
