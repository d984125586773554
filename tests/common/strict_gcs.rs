//! A strict GCS JSON API server, in memory, for the conformance suite.
//!
//! fake-gcs-server (1.54) enforces `ifGenerationMatch` only on `uploadType=multipart` uploads: it
//! ignores it on reads, compose, copy and delete. This server answers only the calls `GcsStore`
//! makes, and enforces `ifGenerationMatch` on every one of them (`0` = no live object), and
//! `generation` on reads, the way GCS documents them, so that the precondition cases run through
//! the real client code:
//!
//! - `GET  /storage/v1/b/B/o` (objects.list: prefix, delimiter, startOffset, pageToken, and
//!   maxResults counting objects and prefixes together, each prefix listed once);
//! - `GET  /storage/v1/b/B/o/O` (objects.get, metadata or `alt=media` with a `Range`);
//! - `POST /upload/storage/v1/b/B/o?uploadType=multipart` (objects.insert);
//! - `POST /storage/v1/b/B/o/O/compose`, `POST /storage/v1/b/B/o/O/copyTo/b/B/o/O`;
//! - `DELETE /storage/v1/b/B/o/O`.
//!
//! Buckets have no object versioning: a replaced generation is gone. Each connection serves one
//! request (`Connection: close`).
//!
//! For the credential tests it also plays Google's token endpoints: a bucket made with
//! [`StrictGcs::create_bucket_with_token`] answers only requests bearing that access token (401
//! without one, 403 with another); `POST /token` (an OAuth token URI, as named in a credentials
//! file) trades [`REFRESH_TOKEN`] for [`USER_TOKEN`], and `/computeMetadata/v1/` (the GCE/GKE
//! metadata server, for `GCE_METADATA_HOST`) hands out [`METADATA_TOKEN`].

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::SystemTime;

use serde_json::{Value, json};

pub struct StrictGcs {
    endpoint: String,
    state: Arc<Mutex<State>>,
}

/// The refresh token of the authorized-user credentials the token endpoint accepts.
pub const REFRESH_TOKEN: &str = "strict-refresh-token";
/// The access token `POST /token` gives for [`REFRESH_TOKEN`].
pub const USER_TOKEN: &str = "strict-user-token";
/// The access token the metadata server gives.
pub const METADATA_TOKEN: &str = "strict-metadata-token";

#[derive(Default)]
struct State {
    buckets: BTreeMap<String, BTreeMap<String, Obj>>,
    /// Buckets that answer only requests bearing this access token.
    tokens: BTreeMap<String, String>,
    last_generation: i64,
}

#[derive(Clone)]
struct Obj {
    data: Arc<Vec<u8>>,
    generation: i64,
    updated: SystemTime,
}

impl StrictGcs {
    /// The server of this test process, started on first use.
    pub fn get() -> &'static StrictGcs {
        static SERVER: OnceLock<StrictGcs> = OnceLock::new();
        SERVER.get_or_init(StrictGcs::start)
    }

    fn start() -> StrictGcs {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(State::default()));
        let shared = state.clone();
        let base = endpoint.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let state = shared.clone();
                let base = base.clone();
                std::thread::spawn(move || serve(conn, &state, &base));
            }
        });
        StrictGcs { endpoint, state }
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The `host:port` of the server, as `GCE_METADATA_HOST` wants it.
    pub fn host(&self) -> &str {
        self.endpoint.trim_start_matches("http://")
    }

    pub fn create_bucket(&self, name: &str) {
        self.state
            .lock()
            .unwrap()
            .buckets
            .insert(name.to_string(), BTreeMap::new());
    }

    /// A bucket that answers only requests with `Authorization: Bearer TOKEN`.
    pub fn create_bucket_with_token(&self, name: &str, token: &str) {
        self.create_bucket(name);
        self.state
            .lock()
            .unwrap()
            .tokens
            .insert(name.to_string(), token.to_string());
    }

    /// Stores an object directly (for buckets the tests cannot write to without credentials).
    pub fn put_object(&self, bucket: &str, name: &str, data: &[u8]) {
        let mut st = self.state.lock().unwrap();
        write(&mut st, bucket, name, Arc::new(data.to_vec()), None)
            .unwrap_or_else(|_| panic!("no bucket {bucket}"));
    }
}

struct Request {
    method: String,
    path: String,
    query: Vec<(String, String)>,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Request {
    fn param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn int_param(&self, name: &str) -> Result<Option<i64>, Response> {
        self.param(name)
            .map(|v| {
                v.parse()
                    .map_err(|_| error(400, "invalid", &format!("bad {name}: {v}")))
            })
            .transpose()
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

struct Response {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: Vec<u8>,
}

fn json_response(status: u16, value: Value) -> Response {
    Response {
        status,
        headers: vec![("Content-Type", "application/json".into())],
        body: value.to_string().into_bytes(),
    }
}

fn error(status: u16, reason: &str, message: &str) -> Response {
    json_response(
        status,
        json!({"error": {"code": status, "message": message,
            "errors": [{"domain": "global", "reason": reason, "message": message}]}}),
    )
}

fn no_bucket() -> Response {
    error(404, "notFound", "The specified bucket does not exist.")
}

fn no_object(bucket: &str, name: &str) -> Response {
    error(404, "notFound", &format!("No such object: {bucket}/{name}"))
}

fn condition_not_met() -> Response {
    error(
        412,
        "conditionNotMet",
        "At least one of the pre-conditions you specified did not hold.",
    )
}

/// `ifGenerationMatch`: `0` requires no live object, `g` requires live generation `g`.
fn check_generation(live: Option<&Obj>, wanted: Option<i64>) -> Result<(), Response> {
    match (wanted, live) {
        (None, _) | (Some(0), None) => Ok(()),
        (Some(g), Some(o)) if o.generation == g => Ok(()),
        _ => Err(condition_not_met()),
    }
}

fn serve(mut conn: TcpStream, state: &Mutex<State>, base: &str) {
    let response = match read_request(&conn) {
        Ok(req) => route(&req, state, base).unwrap_or_else(|r| r),
        Err(r) => r,
    };
    let reason = match response.status {
        200 => "OK",
        204 => "No Content",
        206 => "Partial Content",
        _ => "Error",
    };
    // The server's clock, as GCS sends it (what `head_timed` reads).
    let date = aws_smithy_types::DateTime::from(SystemTime::now())
        .fmt(aws_smithy_types::date_time::Format::HttpDate)
        .unwrap();
    let mut head = format!(
        "HTTP/1.1 {} {reason}\r\nContent-Length: {}\r\nConnection: close\r\nDate: {date}\r\n",
        response.status,
        response.body.len()
    );
    for (k, v) in &response.headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let _ = conn.write_all(head.as_bytes());
    let _ = conn.write_all(&response.body);
    let _ = conn.flush();
}

fn read_request(conn: &TcpStream) -> Result<Request, Response> {
    let bad = |m: &str| error(400, "invalid", m);
    let mut reader = BufReader::new(conn);
    let mut line = String::new();
    reader.read_line(&mut line).map_err(|_| bad("no request"))?;
    let mut parts = line.split_whitespace();
    let method = parts.next().ok_or_else(|| bad("no method"))?.to_string();
    let target = parts.next().ok_or_else(|| bad("no target"))?.to_string();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        reader.read_line(&mut h).map_err(|_| bad("bad header"))?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let mut req = Request {
        method,
        path: path.to_string(),
        query: url::form_urlencoded::parse(query.as_bytes())
            .into_owned()
            .collect(),
        headers,
        body: Vec::new(),
    };
    if req.header("transfer-encoding").is_some() {
        return Err(error(411, "invalid", "chunked bodies are not served here"));
    }
    let len: usize = req
        .header("content-length")
        .map(|v| v.parse().map_err(|_| bad("bad content-length")))
        .transpose()?
        .unwrap_or(0);
    req.body = vec![0; len];
    reader
        .read_exact(&mut req.body)
        .map_err(|_| bad("short body"))?;
    Ok(req)
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && let Some(v) = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn route(req: &Request, state: &Mutex<State>, base: &str) -> Result<Response, Response> {
    let segs: Vec<String> = req
        .path
        .trim_start_matches('/')
        .split('/')
        .map(percent_decode)
        .collect();
    let segs: Vec<&str> = segs.iter().map(String::as_str).collect();
    let mut st = state.lock().unwrap();
    if let ["storage", "v1", "b", b, ..] | ["upload", "storage", "v1", "b", b, ..] = segs.as_slice()
        && let Some(token) = st.tokens.get(*b)
    {
        match req.header("authorization") {
            None => return Err(error(401, "required", "Anonymous caller has no access")),
            Some(a) if a != format!("Bearer {token}") => {
                return Err(error(403, "forbidden", "The caller has no access"));
            }
            Some(_) => {}
        }
    }
    match (req.method.as_str(), segs.as_slice()) {
        ("POST", ["token"]) => token_endpoint(req),
        ("GET", ["computeMetadata", "v1", rest @ ..]) => {
            if req.header("metadata-flavor") != Some("Google") {
                return Err(error(403, "forbidden", "Metadata-Flavor: Google required"));
            }
            let text = match rest {
                ["instance", "service-accounts", "default", "token"] => {
                    return Ok(json_response(
                        200,
                        json!({"access_token": METADATA_TOKEN, "token_type": "Bearer", "expires_in": 3600}),
                    ));
                }
                ["project", "project-id"] => "strict-project",
                ["instance", "service-accounts", "default", "email"] => "strict@strict-project",
                _ => return Err(error(404, "notFound", "no such metadata")),
            };
            Ok(Response {
                status: 200,
                headers: vec![("Metadata-Flavor", "Google".into())],
                body: text.as_bytes().to_vec(),
            })
        }
        ("GET", ["storage", "v1", "b", b, "o"]) => list(req, &st, b),
        ("GET", ["storage", "v1", "b", b, "o", o]) => get(req, &st, b, o, base),
        ("DELETE", ["storage", "v1", "b", b, "o", o]) => {
            let objects = st.buckets.get_mut(*b).ok_or_else(no_bucket)?;
            let live = objects.get(*o).ok_or_else(|| no_object(b, o))?;
            check_generation(Some(live), req.int_param("ifGenerationMatch")?)?;
            objects.remove(*o);
            Ok(Response {
                status: 204,
                headers: Vec::new(),
                body: Vec::new(),
            })
        }
        ("POST", ["upload", "storage", "v1", "b", b, "o"]) => insert(req, &mut st, b, base),
        ("POST", ["storage", "v1", "b", b, "o", o, "compose"]) => compose(req, &mut st, b, o, base),
        (
            "POST",
            [
                "storage",
                "v1",
                "b",
                b,
                "o",
                src,
                "copyTo",
                "b",
                b2,
                "o",
                dst,
            ],
        ) if b == b2 => {
            let objects = st.buckets.get(*b).ok_or_else(no_bucket)?;
            let data = objects
                .get(*src)
                .ok_or_else(|| no_object(b, src))?
                .data
                .clone();
            let o = write(&mut st, b, dst, data, req.int_param("ifGenerationMatch")?)?;
            Ok(json_response(200, resource(b, dst, &o, base)))
        }
        _ => Err(error(
            501,
            "notImplemented",
            &format!("{} {} is not served here", req.method, req.path),
        )),
    }
}

/// An OAuth token URI: trades [`REFRESH_TOKEN`] for [`USER_TOKEN`], refuses anything else.
fn token_endpoint(req: &Request) -> Result<Response, Response> {
    // Authorized-user credentials post JSON; other OAuth clients post a form.
    let fields: BTreeMap<String, String> = match serde_json::from_slice::<Value>(&req.body) {
        Ok(Value::Object(m)) => m
            .into_iter()
            .filter_map(|(k, v)| Some((k, v.as_str()?.to_string())))
            .collect(),
        _ => url::form_urlencoded::parse(&req.body)
            .into_owned()
            .collect(),
    };
    let field = |k: &str| fields.get(k).map(String::as_str);
    if field("grant_type") == Some("refresh_token") && field("refresh_token") == Some(REFRESH_TOKEN)
    {
        return Ok(json_response(
            200,
            json!({"access_token": USER_TOKEN, "token_type": "Bearer", "expires_in": 3600}),
        ));
    }
    Err(json_response(
        400,
        json!({"error": "invalid_grant", "error_description": "Token has been expired or revoked."}),
    ))
}

/// Stores `data` at `name` if `if_generation_match` holds, under a new generation.
fn write(
    st: &mut State,
    bucket: &str,
    name: &str,
    data: Arc<Vec<u8>>,
    if_generation_match: Option<i64>,
) -> Result<Obj, Response> {
    let now = SystemTime::now();
    let micros = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64;
    st.last_generation = (st.last_generation + 1).max(micros);
    let generation = st.last_generation;
    let objects = st.buckets.get_mut(bucket).ok_or_else(no_bucket)?;
    check_generation(objects.get(name), if_generation_match)?;
    let o = Obj {
        data,
        generation,
        updated: now,
    };
    objects.insert(name.to_string(), o.clone());
    Ok(o)
}

fn rfc3339(t: SystemTime) -> String {
    time::OffsetDateTime::from(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

fn resource(bucket: &str, name: &str, o: &Obj, base: &str) -> Value {
    let link = format!(
        "{base}/storage/v1/b/{bucket}/o/{}",
        url::form_urlencoded::byte_serialize(name.as_bytes()).collect::<String>()
    );
    json!({
        "kind": "storage#object",
        "id": format!("{bucket}/{name}/{}", o.generation),
        "selfLink": link,
        "mediaLink": format!("{link}?alt=media"),
        "name": name,
        "bucket": bucket,
        "generation": o.generation.to_string(),
        "metageneration": "1",
        "contentType": "application/octet-stream",
        "size": o.data.len().to_string(),
        "timeCreated": rfc3339(o.updated),
        "updated": rfc3339(o.updated),
    })
}

fn get(req: &Request, st: &State, b: &str, o: &str, base: &str) -> Result<Response, Response> {
    let objects = st.buckets.get(b).ok_or_else(no_bucket)?;
    let live = objects.get(o).ok_or_else(|| no_object(b, o))?;
    check_generation(Some(live), req.int_param("ifGenerationMatch")?)?;
    if req
        .int_param("generation")?
        .is_some_and(|g| g != live.generation)
    {
        return Err(no_object(b, o));
    }
    if req.param("alt") != Some("media") {
        return Ok(json_response(200, resource(b, o, live, base)));
    }
    let len = live.data.len() as u64;
    let mut headers = vec![
        ("Content-Type", "application/octet-stream".to_string()),
        ("X-Goog-Generation", live.generation.to_string()),
    ];
    let Some(range) = req.header("range") else {
        return Ok(Response {
            status: 200,
            headers,
            body: live.data.to_vec(),
        });
    };
    let (start, end) = range
        .strip_prefix("bytes=")
        .and_then(|r| r.split_once('-'))
        .and_then(|(s, e)| Some((s.parse::<u64>().ok()?, e.parse::<u64>().ok()?)))
        .ok_or_else(|| error(400, "invalid", &format!("range {range} is not served here")))?;
    if start >= len || end < start {
        return Err(error(
            416,
            "requestedRangeNotSatisfiable",
            "range not satisfiable",
        ));
    }
    let end = end.min(len - 1);
    headers.push(("Content-Range", format!("bytes {start}-{end}/{len}")));
    Ok(Response {
        status: 206,
        headers,
        body: live.data[start as usize..=end as usize].to_vec(),
    })
}

fn list(req: &Request, st: &State, b: &str) -> Result<Response, Response> {
    let objects = st.buckets.get(b).ok_or_else(no_bucket)?;
    let prefix = req.param("prefix").unwrap_or("");
    let delimiter = req.param("delimiter").filter(|d| !d.is_empty());
    let start = req.param("startOffset").unwrap_or("");
    let after = req.param("pageToken");
    let max = req.int_param("maxResults")?.unwrap_or(1000).clamp(1, 1000) as usize;
    // Every entry in order, each prefix once: (name, object or prefix).
    let mut entries: Vec<(String, Option<&Obj>)> = Vec::new();
    for (name, o) in objects.range(start.to_string()..) {
        let Some(rest) = name.strip_prefix(prefix) else {
            continue;
        };
        let entry = match delimiter.and_then(|d| rest.find(d).map(|i| i + d.len())) {
            Some(end) => (format!("{prefix}{}", &rest[..end]), None),
            None => (name.clone(), Some(o)),
        };
        if entries.last().is_some_and(|last| last.0 == entry.0) {
            continue;
        }
        entries.push(entry);
    }
    let mut rest = entries
        .into_iter()
        .filter(|(name, _)| after.is_none_or(|a| name.as_str() > a))
        .peekable();
    let mut items = Vec::new();
    let mut prefixes = Vec::new();
    let mut last = None;
    for _ in 0..max {
        let Some((name, object)) = rest.next() else {
            break;
        };
        match object {
            Some(o) => items.push(resource(b, &name, o, "")),
            None => prefixes.push(Value::String(name.clone())),
        }
        last = Some(name);
    }
    let mut out = json!({"kind": "storage#objects", "items": items, "prefixes": prefixes});
    if rest.peek().is_some() {
        out["nextPageToken"] = Value::String(last.unwrap_or_default());
    }
    Ok(json_response(200, out))
}

fn insert(req: &Request, st: &mut State, b: &str, base: &str) -> Result<Response, Response> {
    if req.param("uploadType") != Some("multipart") {
        return Err(error(
            501,
            "notImplemented",
            "only uploadType=multipart is served here",
        ));
    }
    let content_type = req.header("content-type").unwrap_or("");
    let boundary = content_type
        .split(';')
        .find_map(|p| p.trim().strip_prefix("boundary="))
        .map(|b| b.trim_matches('"').to_string())
        .ok_or_else(|| error(400, "invalid", "no multipart boundary"))?;
    let parts = multipart_parts(&req.body, &boundary);
    let [metadata, data] = parts.as_slice() else {
        return Err(error(400, "invalid", "expected metadata and data parts"));
    };
    let metadata: Value = serde_json::from_slice(metadata)
        .map_err(|e| error(400, "invalid", &format!("metadata: {e}")))?;
    let name = metadata["name"]
        .as_str()
        .filter(|n| !n.is_empty())
        .ok_or_else(|| error(400, "required", "object name required"))?
        .to_string();
    let o = write(
        st,
        b,
        &name,
        Arc::new(data.to_vec()),
        req.int_param("ifGenerationMatch")?,
    )?;
    Ok(json_response(200, resource(b, &name, &o, base)))
}

/// The bodies of a multipart body's parts, in order.
fn multipart_parts<'a>(body: &'a [u8], boundary: &str) -> Vec<&'a [u8]> {
    let delimiter = format!("--{boundary}");
    let mut out = Vec::new();
    let mut rest = body;
    while let Some(at) = find(rest, delimiter.as_bytes()) {
        let part = &rest[..at];
        rest = &rest[at + delimiter.len()..];
        if let Some(head_end) = find(part, b"\r\n\r\n") {
            let content = &part[head_end + 4..];
            out.push(content.strip_suffix(b"\r\n").unwrap_or(content));
        }
    }
    out
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn compose(
    req: &Request,
    st: &mut State,
    b: &str,
    dst: &str,
    base: &str,
) -> Result<Response, Response> {
    let body: Value = serde_json::from_slice(&req.body)
        .map_err(|e| error(400, "invalid", &format!("compose body: {e}")))?;
    let sources = body["sourceObjects"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if sources.is_empty() || sources.len() > 32 {
        return Err(error(
            400,
            "invalid",
            "compose takes 1 to 32 source objects",
        ));
    }
    let objects = st.buckets.get(b).ok_or_else(no_bucket)?;
    let mut data = Vec::new();
    for s in &sources {
        let name = s["name"].as_str().unwrap_or_default();
        let o = objects.get(name).ok_or_else(|| no_object(b, name))?;
        let wanted = match &s["generation"] {
            Value::Number(n) => n.as_i64(),
            Value::String(g) => g.parse().ok(),
            _ => None,
        };
        if wanted.is_some_and(|g| g != o.generation) {
            return Err(no_object(b, name));
        }
        data.extend_from_slice(&o.data);
    }
    let o = write(
        st,
        b,
        dst,
        Arc::new(data),
        req.int_param("ifGenerationMatch")?,
    )?;
    Ok(json_response(200, resource(b, dst, &o, base)))
}
