//! The bearer-token flow (`WWW-Authenticate: Bearer realm=…,service=…,scope=…`) against the
//! real distribution registry configured with token auth, and a small token server started
//! here: it checks the user's password (basic auth, from `$DOCKER_CONFIG/config.json`), logs
//! what it was asked, and signs a JWT with the key whose certificate the registry trusts.
//! One test per binary: `DOCKER_CONFIG` is process-wide.

mod common;

use common::auth::{docker_config, tiny_image};
use rbuild::registry::{Registry, RegistryError, RegistryOptions};
use rbuild_cache::Store;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const SERVICE: &str = "rbuild-test-registry";
const ISSUER: &str = "rbuild-test-issuer";

/// The token server: Python's standard library, with `openssl` signing (RS256), so that the
/// registry verifies a token nobody here wrote a signer for.
const TOKEN_SERVER: &str = r#"
import base64, http.server, json, subprocess, sys, time, urllib.parse, uuid
port, key, cert_der, user, password, log = sys.argv[1:7]
x5c = base64.b64encode(open(cert_der, 'rb').read()).decode()
def b64(b): return base64.urlsafe_b64encode(b).rstrip(b'=').decode()
class H(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a): pass
    def do_GET(self):
        u = urllib.parse.urlparse(self.path)
        q = urllib.parse.parse_qs(u.query)
        auth = self.headers.get('Authorization', '')
        ok = auth == 'Basic ' + base64.b64encode(f'{user}:{password}'.encode()).decode()
        with open(log, 'a') as f:
            f.write(json.dumps({'path': u.path, 'query': q, 'basic': auth.startswith('Basic '), 'ok': ok}) + '\n')
        if not ok:
            self.send_response(401); self.end_headers(); return
        access = []
        for s in q.get('scope', []):
            typ, name, actions = s.split(':')[0], ':'.join(s.split(':')[1:-1]), s.split(':')[-1]
            access.append({'type': typ, 'name': name, 'actions': actions.split(',')})
        now = int(time.time())
        head = {'typ': 'JWT', 'alg': 'RS256', 'x5c': [x5c]}
        claims = {'iss': sys.argv[7], 'sub': user, 'aud': q.get('service', [''])[0], 'exp': now + 300,
                  'nbf': now - 10, 'iat': now, 'jti': str(uuid.uuid4()), 'access': access}
        signing = b64(json.dumps(head).encode()) + '.' + b64(json.dumps(claims).encode())
        sig = subprocess.run(['openssl', 'dgst', '-sha256', '-sign', key], input=signing.encode(),
                             capture_output=True, check=True).stdout
        token = signing + '.' + b64(sig)
        body = json.dumps({'token': token, 'access_token': token, 'expires_in': 300}).encode()
        self.send_response(200)
        self.send_header('Content-Type', 'application/json')
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        self.wfile.write(body)
http.server.ThreadingHTTPServer(('127.0.0.1', int(port)), H).serve_forever()
"#;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_for(addr: &str, what: &str) {
    for _ in 0..100 {
        if std::net::TcpStream::connect(addr).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{what} did not come up on {addr}");
}

/// A registry with token auth and its token server, killed on drop.
struct TokenRegistry {
    addr: String,
    children: Vec<Child>,
    dir: tempfile::TempDir,
}

impl TokenRegistry {
    fn start(user: &str, pass: &str) -> TokenRegistry {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        // The signing key and the certificate the registry trusts (its rootcertbundle).
        let out = Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            ])
            .args(["-subj", &format!("/CN={ISSUER}")])
            .arg("-keyout")
            .arg(d.join("key.pem"))
            .arg("-out")
            .arg(d.join("cert.pem"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let out = Command::new("openssl")
            .args(["x509", "-outform", "der", "-in"])
            .arg(d.join("cert.pem"))
            .arg("-out")
            .arg(d.join("cert.der"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        std::fs::write(d.join("server.py"), TOKEN_SERVER).unwrap();
        let token_port = free_port();
        let token_server = Command::new("python3")
            .arg(d.join("server.py"))
            .arg(token_port.to_string())
            .arg(d.join("key.pem"))
            .arg(d.join("cert.der"))
            .args([user, pass])
            .arg(d.join("token.log"))
            .arg(ISSUER)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(d.join("token-server.log")).unwrap())
            .spawn()
            .unwrap();
        let addr = format!("127.0.0.1:{}", free_port());
        let dd = d.display();
        std::fs::write(
            d.join("config.yml"),
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {dd}/data\nhttp:\n  addr: {addr}\n\
                 auth:\n  token:\n    realm: http://127.0.0.1:{token_port}/token\n    service: {SERVICE}\n    issuer: {ISSUER}\n    rootcertbundle: {dd}/cert.pem\n"
            ),
        )
        .unwrap();
        let registry = Command::new("docker-registry")
            .arg("serve")
            .arg(d.join("config.yml"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(d.join("registry.log")).unwrap())
            .spawn()
            .unwrap();
        let me = TokenRegistry {
            addr,
            children: vec![token_server, registry],
            dir,
        };
        wait_for(&format!("127.0.0.1:{token_port}"), "the token server");
        wait_for(&me.addr, "the registry with token auth");
        me
    }

    /// What the token server was asked, one JSON object per request.
    fn token_requests(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.dir.path().join("token.log"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

impl Drop for TokenRegistry {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn bearer_token_flow_with_a_token_server() {
    let reg = TokenRegistry::start("bob", "t0ken-pw");
    let t = tempfile::tempdir().unwrap();
    let store = Store::open(&t.path().join("store")).unwrap();
    let image = tiny_image(&store);
    let target = format!("{}/team/app:v1", reg.addr);
    let client = || Registry::new(RegistryOptions::default());

    // Wrong password: the token server refuses, and so does the push.
    docker_config(&t.path().join("wrong"), &reg.addr, "bob", "nope");
    std::env::set_var("DOCKER_CONFIG", t.path().join("wrong"));
    let err = client()
        .push(&image, &store, std::slice::from_ref(&target))
        .await
        .unwrap_err();
    assert!(matches!(err, RegistryError::Unauthorized { .. }), "{err:?}");
    assert!(err.to_string().contains(&target), "{err}");
    let asked = reg.token_requests();
    assert!(
        !asked.is_empty() && asked.iter().all(|r| r["ok"] == false),
        "the token server was asked, and refused: {asked:?}"
    );

    // Right password: the registry's challenge sends rbuild to the realm with its service and
    // the repository's scope; the token it gets lets it push, and then pull.
    docker_config(&t.path().join("right"), &reg.addr, "bob", "t0ken-pw");
    std::env::set_var("DOCKER_CONFIG", t.path().join("right"));
    let d = client()
        .push(&image, &store, std::slice::from_ref(&target))
        .await
        .unwrap();
    assert_eq!(d, image.manifest_digest);
    let granted: Vec<serde_json::Value> = reg
        .token_requests()
        .into_iter()
        .filter(|r| r["ok"] == true)
        .collect();
    assert!(!granted.is_empty(), "no token was issued");
    for r in &granted {
        assert_eq!(r["path"], "/token", "{r}");
        assert_eq!(r["query"]["service"][0], SERVICE, "{r}");
        assert!(r["basic"] == true, "{r}");
    }
    let scopes: Vec<String> = granted
        .iter()
        .flat_map(|r| r["query"]["scope"].as_array().cloned().unwrap_or_default())
        .filter_map(|s| s.as_str().map(str::to_owned))
        .collect();
    assert!(
        scopes
            .iter()
            .any(|s| s.starts_with("repository:team/app:") && s.contains("push")),
        "{scopes:?}"
    );

    let fresh = Store::open(&t.path().join("fresh")).unwrap();
    let pulled = client().pull(&target, &fresh).await.unwrap();
    assert_eq!(pulled.manifest_digest, image.manifest_digest);
    assert_eq!(pulled.layers, image.layers);

    // A tool nobody here wrote reads it through the same token server.
    let out = common::ok(
        Command::new("skopeo")
            .args(["inspect", "--tls-verify=false", "--creds", "bob:t0ken-pw"])
            .arg(format!("docker://{target}")),
    );
    let inspect: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(inspect["Digest"], image.manifest_digest.to_string());
}
