//! `GET /retrieve/{id}` (where a payload is, its ZIP once Completed) and
//! `GET /retrieve_partial/{id}` (its work directory as it is now).

use std::time::Duration;

use axum::http::StatusCode;
use jobrelay_common::protocol::{PayloadRecord, RESULT_KEY_HEADER, RESULT_NODE_HEADER};

use super::{exchange, url, Download, Failure, To, SMALL_REQUEST};
use crate::clients::{self, ClientHandle};
use crate::Shared;

/// What the client says of one payload.
pub enum Retrieved {
    /// It is Completed: its result ZIP.
    Zip(ResultZip),
    /// It is not Completed: its record.
    Record(PayloadRecord),
    /// 404: the client does not know the payload. Each failure says what was asked and
    /// what came back.
    NotFound(String),
    /// 410: the client removed the payload's files.
    Gone(String),
    /// Another answer, or a record that could not be read.
    Failed(String),
    /// No answer.
    Unreachable(String),
}

/// A result ZIP with whose run it is, as its headers say.
pub struct ResultZip {
    /// The dispatch key of the run: `None` when the client does not say (no `result_key`
    /// extension), `Some(None)` when it says the payload has none.
    pub key: Option<Option<String>>,
    /// The client's node, if the answer says.
    pub node: Option<String>,
    pub body: Download,
}

/// The kind of a `/retrieve` answer, from its status and content type.
#[derive(Debug, PartialEq)]
enum RetrieveAnswer {
    Zip,
    Record,
    NotFound,
    Gone,
    Failed,
}

fn retrieve_answer(status: StatusCode, content_type: Option<&str>) -> RetrieveAnswer {
    match status {
        StatusCode::NOT_FOUND => RetrieveAnswer::NotFound,
        StatusCode::GONE => RetrieveAnswer::Gone,
        s if !s.is_success() => RetrieveAnswer::Failed,
        _ if content_type.is_some_and(|v| v.starts_with("application/zip")) => RetrieveAnswer::Zip,
        _ => RetrieveAnswer::Record,
    }
}

/// `GET /retrieve/{dest}`: where the payload is, its ZIP once Completed.
pub async fn retrieve(shared: &Shared, client: &ClientHandle, dest: i64) -> Retrieved {
    retrieve_within(shared, client, dest, None).await
}

/// [`retrieve`] that gives up after [`SMALL_REQUEST`] for the whole answer: a look at a
/// payload that someone waits for (before a kill), whose ZIP, if any, is not read.
pub async fn look(shared: &Shared, client: &ClientHandle, dest: i64) -> Retrieved {
    retrieve_within(shared, client, dest, Some(SMALL_REQUEST)).await
}

async fn retrieve_within(
    shared: &Shared,
    client: &ClientHandle,
    dest: i64,
    timeout: Option<Duration>,
) -> Retrieved {
    let url = url(&client.endpoint, To::Retrieve(dest));
    let mut request = client.http.get(&url);
    if let Some(timeout) = timeout {
        request = request.timeout(timeout);
    }
    let response = match request.send().await {
        Ok(r) => r,
        Err(e) => {
            let why = e.to_string();
            clients::failed(&shared.lifecycle, client, &why);
            return Retrieved::Unreachable(why);
        }
    };
    clients::reached(client);
    let status = response.status();
    let answered = || format!("GET {url} answered {status}");
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    match retrieve_answer(
        status,
        header(reqwest::header::CONTENT_TYPE.as_str()).as_deref(),
    ) {
        RetrieveAnswer::NotFound => Retrieved::NotFound(answered()),
        RetrieveAnswer::Gone => Retrieved::Gone(answered()),
        RetrieveAnswer::Failed => Retrieved::Failed(answered()),
        RetrieveAnswer::Zip => Retrieved::Zip(ResultZip {
            key: client.has("result_key").then(|| header(RESULT_KEY_HEADER)),
            node: header(RESULT_NODE_HEADER),
            body: Download(response),
        }),
        RetrieveAnswer::Record => match response.json::<PayloadRecord>().await {
            Ok(record) => Retrieved::Record(record),
            Err(e) => Retrieved::Failed(format!("unreadable payload record: {e}")),
        },
    }
}

/// `GET /retrieve_partial/{dest}`: a ZIP of the payload's work directory as it is now.
pub async fn retrieve_partial(
    shared: &Shared,
    client: &ClientHandle,
    dest: i64,
) -> Result<Download, Failure> {
    let request = client
        .http
        .get(url(&client.endpoint, To::RetrievePartial(dest)));
    let response = exchange(shared, client, request).await?;
    if response.status().is_success() {
        Ok(Download(response))
    } else {
        Err(Failure::Answered(response.status()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_retrieve_answer_is_a_zip_only_by_its_content_type() {
        let ok = StatusCode::OK;
        assert_eq!(
            retrieve_answer(ok, Some("application/zip")),
            RetrieveAnswer::Zip
        );
        assert_eq!(
            retrieve_answer(ok, Some("application/json")),
            RetrieveAnswer::Record
        );
        assert_eq!(retrieve_answer(ok, None), RetrieveAnswer::Record);
        assert_eq!(
            retrieve_answer(StatusCode::NOT_FOUND, Some("application/json")),
            RetrieveAnswer::NotFound
        );
        assert_eq!(
            retrieve_answer(StatusCode::GONE, None),
            RetrieveAnswer::Gone
        );
        // An error answer is never taken for results, whatever it says it carries.
        assert_eq!(
            retrieve_answer(StatusCode::INTERNAL_SERVER_ERROR, Some("application/zip")),
            RetrieveAnswer::Failed
        );
    }
}
