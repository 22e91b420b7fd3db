//! A client of the OpenAI-compatible HTTP API that serving engines speak (vLLM, llama.cpp's
//! server, llama-cpp-python's): chat completions, the model list, and vLLM's runtime LoRA
//! endpoints. Blocking (generation runs on a worker thread), with a timeout per request and
//! retries with exponential backoff. Requests are built and answers parsed by pure functions,
//! so what an engine may answer is tested without one.

use std::time::Duration;

use serde_json::{Value, json};

/// What went wrong talking to the engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// No answer: connection refused, reset, timed out.
    #[error("engine at {url} unreachable: {reason}")]
    Unreachable {
        /// The request's URL.
        url: String,
        /// What the connection said.
        reason: String,
    },
    /// The engine answered with an error status.
    #[error("engine at {url} answered {status}: {body}")]
    Status {
        /// The request's URL.
        url: String,
        /// HTTP status.
        status: u16,
        /// The start of the body (the engine's message).
        body: String,
    },
    /// The engine answered 2xx with something that is not the expected JSON.
    #[error("engine at {url} answered malformed data: {reason}")]
    Malformed {
        /// The request's URL.
        url: String,
        /// What was wrong.
        reason: String,
    },
}

impl EngineError {
    /// Worth retrying: the engine is down or busy, not refusing the request itself.
    fn transient(&self) -> bool {
        match self {
            EngineError::Unreachable { .. } => true,
            EngineError::Status { status, .. } => *status == 429 || *status >= 500,
            EngineError::Malformed { .. } => false,
        }
    }
}

/// How one chat completion is sampled.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatSampling {
    /// Softmax temperature.
    pub temperature: f32,
    /// Nucleus filter (1 = off).
    pub top_p: f32,
    /// Top-k filter (0 = off; an extension that vLLM and llama.cpp accept).
    pub top_k: usize,
    /// Most new tokens.
    pub max_tokens: usize,
    /// Sampling seed (engines that honor it give the same answer for the same seed).
    pub seed: u64,
}

/// The body of `POST /v1/chat/completions` for one user message.
pub fn chat_request(model: &str, user: &str, s: &ChatSampling) -> Value {
    let mut body = json!({
        "model": model,
        "messages": [{"role": "user", "content": user}],
        "temperature": s.temperature,
        "top_p": s.top_p,
        "max_tokens": s.max_tokens,
        "seed": s.seed,
        "n": 1,
        "stream": false,
    });
    if s.top_k > 0 {
        body["top_k"] = json!(s.top_k);
    }
    body
}

/// The answer's text from a chat completion response.
pub fn parse_chat(body: &str) -> Result<String, String> {
    let v: Value = serde_json::from_str(body).map_err(|e| format!("not JSON ({e})"))?;
    let choice = v
        .get("choices")
        .and_then(Value::as_array)
        .and_then(|c| c.first())
        .ok_or("no choices")?;
    match choice.pointer("/message/content") {
        Some(Value::String(s)) => Ok(s.clone()),
        // Some engines answer an empty completion with null content.
        Some(Value::Null) => Ok(String::new()),
        _ => Err("a choice without message.content".into()),
    }
}

/// The model ids from `GET /v1/models`.
pub fn parse_models(body: &str) -> Result<Vec<String>, String> {
    let v: Value = serde_json::from_str(body).map_err(|e| format!("not JSON ({e})"))?;
    let data = v.get("data").and_then(Value::as_array).ok_or("no data")?;
    data.iter()
        .map(|m| {
            m.get("id")
                .and_then(Value::as_str)
                .map(str::to_string)
                .ok_or_else(|| "a model without an id".to_string())
        })
        .collect()
}

/// Where the engine is and how to talk to it.
#[derive(Debug, Clone)]
pub struct EngineEndpoint {
    /// Base URL up to and including `/v1`, e.g. `http://127.0.0.1:8000/v1`.
    pub base_url: String,
    /// Bearer token, if the engine wants one.
    pub api_key: Option<String>,
    /// Timeout of one request.
    pub timeout: Duration,
    /// Attempts after the first for a transient failure.
    pub retries: u32,
    /// First backoff; doubled after each failed attempt, up to 16 times the first.
    pub backoff: Duration,
}

/// A blocking client of one engine.
#[derive(Clone)]
pub struct EngineClient {
    endpoint: EngineEndpoint,
    agent: ureq::Agent,
}

impl EngineClient {
    /// A client of `endpoint` (connects on first use).
    pub fn new(endpoint: EngineEndpoint) -> Self {
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(endpoint.timeout))
            .http_status_as_error(false)
            .build()
            .into();
        Self { endpoint, agent }
    }

    /// The models the engine serves (`GET /models`).
    pub fn models(&self) -> Result<Vec<String>, EngineError> {
        let url = self.url("models");
        let body = self.with_retries(|| self.request(&url, None))?;
        parse_models(&body).map_err(|reason| EngineError::Malformed { url, reason })
    }

    /// One chat completion: the answer to `user` from `model`.
    pub fn chat(&self, model: &str, user: &str, s: &ChatSampling) -> Result<String, EngineError> {
        let url = self.url("chat/completions");
        let req = chat_request(model, user, s);
        let body = self.with_retries(|| self.request(&url, Some(&req)))?;
        parse_chat(&body).map_err(|reason| EngineError::Malformed { url, reason })
    }

    /// Loads a LoRA adapter (a PEFT directory the engine can read) under `name`: vLLM's
    /// `POST /load_lora_adapter` (the engine needs `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`).
    pub fn load_lora(&self, name: &str, path: &str) -> Result<(), EngineError> {
        let url = self.url("load_lora_adapter");
        let req = json!({"lora_name": name, "lora_path": path});
        self.with_retries(|| self.request(&url, Some(&req)))
            .map(drop)
    }

    /// Unloads the LoRA adapter `name` (vLLM's `POST /unload_lora_adapter`).
    pub fn unload_lora(&self, name: &str) -> Result<(), EngineError> {
        let url = self.url("unload_lora_adapter");
        let req = json!({"lora_name": name});
        self.with_retries(|| self.request(&url, Some(&req)))
            .map(drop)
    }

    fn url(&self, path: &str) -> String {
        format!("{}/{path}", self.endpoint.base_url.trim_end_matches('/'))
    }

    /// One request (GET without a body, POST with one); the body of a 2xx answer.
    fn request(&self, url: &str, body: Option<&Value>) -> Result<String, EngineError> {
        let unreachable = |e: ureq::Error| EngineError::Unreachable {
            url: url.to_string(),
            reason: e.to_string(),
        };
        let auth = self
            .endpoint
            .api_key
            .as_ref()
            .map(|k| format!("Bearer {k}"));
        let mut resp = match body {
            None => {
                let mut r = self.agent.get(url);
                if let Some(a) = &auth {
                    r = r.header("Authorization", a);
                }
                r.call().map_err(unreachable)?
            }
            Some(b) => {
                let mut r = self.agent.post(url).content_type("application/json");
                if let Some(a) = &auth {
                    r = r.header("Authorization", a);
                }
                r.send(b.to_string()).map_err(unreachable)?
            }
        };
        let status = resp.status().as_u16();
        let text = resp
            .body_mut()
            .with_config()
            .limit(64 << 20)
            .read_to_string()
            .map_err(|e| EngineError::Malformed {
                url: url.to_string(),
                reason: format!("unreadable body: {e}"),
            })?;
        if !(200..300).contains(&status) {
            return Err(EngineError::Status {
                url: url.to_string(),
                status,
                body: text.chars().take(300).collect(),
            });
        }
        Ok(text)
    }

    fn with_retries<T>(
        &self,
        mut f: impl FnMut() -> Result<T, EngineError>,
    ) -> Result<T, EngineError> {
        let mut wait = self.endpoint.backoff;
        let mut attempt = 0;
        loop {
            match f() {
                Err(e) if e.transient() && attempt < self.endpoint.retries => {
                    attempt += 1;
                    tracing::warn!(error = %e, attempt, wait_ms = wait.as_millis() as u64, "engine request failed; retrying");
                    std::thread::sleep(wait);
                    wait = (wait * 2).min(self.endpoint.backoff * 16);
                }
                r => return r,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_answers_parse_and_bad_ones_say_why() {
        let ok = r#"{"id":"x","choices":[{"index":0,"message":{"role":"assistant","content":"A fine film."},"finish_reason":"stop"}]}"#;
        assert_eq!(parse_chat(ok).unwrap(), "A fine film.");
        let null = r#"{"choices":[{"message":{"role":"assistant","content":null}}]}"#;
        assert_eq!(parse_chat(null).unwrap(), "");
        for (body, why) in [
            ("<html>502 Bad Gateway</html>", "not JSON"),
            ("{\"choices\": []}", "no choices"),
            ("{\"object\": \"error\"}", "no choices"),
            ("{\"choices\": [{\"text\": \"legacy\"}]}", "message.content"),
            (
                "{\"choices\": [{\"message\": {\"content\": 3}}]}",
                "message.content",
            ),
            ("{\"choices\": [{\"message\"", "not JSON"),
        ] {
            let e = parse_chat(body).unwrap_err();
            assert!(e.contains(why), "{body}: {e}");
        }
    }

    #[test]
    fn model_lists_parse() {
        let body =
            r#"{"object":"list","data":[{"id":"smollm2","object":"model"},{"id":"crosslm-r2"}]}"#;
        assert_eq!(parse_models(body).unwrap(), ["smollm2", "crosslm-r2"]);
        assert!(parse_models("{\"data\": [{}]}").unwrap_err().contains("id"));
        assert!(parse_models("[]").unwrap_err().contains("no data"));
    }

    #[test]
    fn requests_say_what_the_task_asks() {
        let s = ChatSampling {
            temperature: 0.9,
            top_p: 0.95,
            top_k: 0,
            max_tokens: 64,
            seed: 7,
        };
        let r = chat_request("m", "Write a review.", &s);
        assert_eq!(r["messages"][0]["content"], "Write a review.");
        assert_eq!(r["seed"], 7);
        assert_eq!(r["max_tokens"], 64);
        assert!(r.get("top_k").is_none(), "off means absent");
        let r = chat_request("m", "x", &ChatSampling { top_k: 50, ..s });
        assert_eq!(r["top_k"], 50);
    }

    #[test]
    fn a_closed_port_is_unreachable_after_the_retries() {
        // A port nobody listens on: bind, read the port, close.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let c = EngineClient::new(EngineEndpoint {
            base_url: format!("http://127.0.0.1:{port}/v1"),
            api_key: None,
            timeout: Duration::from_secs(2),
            retries: 2,
            backoff: Duration::from_millis(10),
        });
        let started = std::time::Instant::now();
        let e = c.models().unwrap_err();
        assert!(matches!(e, EngineError::Unreachable { .. }), "{e}");
        assert!(e.to_string().contains(&port.to_string()), "{e}");
        assert!(
            started.elapsed() >= Duration::from_millis(30),
            "two backoffs"
        );
    }
}
