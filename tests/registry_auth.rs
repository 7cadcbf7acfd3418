//! Credentials from `$DOCKER_CONFIG/config.json` against a registry with htpasswd (basic) auth.
//! One test per binary: `DOCKER_CONFIG` is process-wide.

mod common;

use common::auth::{docker_config, tiny_image};
use rbuild::registry::{Registry, RegistryError, RegistryOptions};
use rbuild_cache::Store;
use std::process::{Child, Command, Stdio};

/// A registry requiring `user`/`pass`, started here and killed (by its own child handle) on drop.
struct AuthRegistry {
    addr: String,
    child: Child,
    _dir: tempfile::TempDir,
}

impl AuthRegistry {
    fn start(user: &str, pass: &str) -> AuthRegistry {
        let dir = tempfile::tempdir().unwrap();
        // bcrypt, the only scheme distribution's htpasswd accepts.
        let out = Command::new("python3")
            .args(["-W", "ignore", "-c", "import crypt,sys; print(crypt.crypt(sys.argv[1], crypt.mksalt(crypt.METHOD_BLOWFISH)))", pass])
            .output()
            .unwrap();
        let hash = String::from_utf8(out.stdout).unwrap();
        assert!(
            hash.starts_with("$2"),
            "no bcrypt from python3's crypt: {hash:?}"
        );
        std::fs::write(
            dir.path().join("htpasswd"),
            format!("{user}:{}\n", hash.trim()),
        )
        .unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        let d = dir.path().display();
        std::fs::write(
            dir.path().join("config.yml"),
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {d}/data\nhttp:\n  addr: {addr}\n\
                 auth:\n  htpasswd:\n    realm: rbuild-test\n    path: {d}/htpasswd\n"
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("registry.log")).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(dir.path().join("config.yml"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let me = AuthRegistry {
            addr,
            child,
            _dir: dir,
        };
        for _ in 0..100 {
            if std::net::TcpStream::connect(&me.addr).is_ok() {
                return me;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        panic!("registry with auth did not come up on {}", me.addr);
    }
}

impl Drop for AuthRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn basic_auth_credentials_come_from_docker_config() {
    let reg = AuthRegistry::start("alice", "s3cret-pw");
    let t = tempfile::tempdir().unwrap();
    let store = Store::open(&t.path().join("store")).unwrap();
    let image = tiny_image(&store);
    let target = format!("{}/private/app:v1", reg.addr);
    let client = || Registry::new(RegistryOptions::default());

    // No credentials: refused, and the error says by whom and for what.
    std::env::set_var("DOCKER_CONFIG", t.path().join("none"));
    let err = client()
        .push(&image, &store, std::slice::from_ref(&target))
        .await
        .unwrap_err();
    assert!(matches!(err, RegistryError::Unauthorized { .. }), "{err:?}");
    assert!(err.to_string().contains(&target), "{err}");

    // Wrong password: refused.
    docker_config(&t.path().join("wrong"), &reg.addr, "alice", "nope");
    std::env::set_var("DOCKER_CONFIG", t.path().join("wrong"));
    let err = client()
        .push(&image, &store, std::slice::from_ref(&target))
        .await
        .unwrap_err();
    assert!(matches!(err, RegistryError::Unauthorized { .. }), "{err:?}");

    // Right password: push, then pull into a fresh store.
    docker_config(&t.path().join("right"), &reg.addr, "alice", "s3cret-pw");
    std::env::set_var("DOCKER_CONFIG", t.path().join("right"));
    let d = client()
        .push(&image, &store, std::slice::from_ref(&target))
        .await
        .unwrap();
    assert_eq!(d, image.manifest_digest);
    let fresh = Store::open(&t.path().join("fresh")).unwrap();
    let pulled = client().pull(&target, &fresh).await.unwrap();
    assert_eq!(pulled.manifest_digest, image.manifest_digest);
    assert_eq!(pulled.layers, image.layers);
}
