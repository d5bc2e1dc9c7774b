//! What the error stream carries at the end of an exec/attach: a `metav1.Status` JSON
//! for v4/v5, plain text on failure for v1–v3.

use vzk_core::ProviderError;
use vzk_core::streams::ExitStatus;

/// The outcome of the provider call.
pub(crate) type Outcome = Result<ExitStatus, ProviderError>;

/// The v4/v5 error-stream message: always one Status JSON object.
pub(crate) fn v4_status(outcome: &Outcome) -> String {
    let v = match outcome {
        Ok(s) if s.success() => serde_json::json!({"metadata": {}, "status": "Success"}),
        Ok(s) => {
            let code = s.code.clamp(0, 255);
            serde_json::json!({
                "metadata": {},
                "status": "Failure",
                "message": format!("command terminated with non-zero exit code: error executing command, exit code {code}"),
                "reason": "NonZeroExitCode",
                "details": {"causes": [{"reason": "ExitCode", "message": code.to_string()}]},
            })
        }
        Err(e) => {
            let msg = crate::error_chain(e);
            serde_json::json!({
                "metadata": {},
                "status": "Failure",
                "message": format!("Internal error occurred: {msg}"),
                "reason": "InternalError",
                "details": {"causes": [{"message": msg}]},
                "code": 500,
            })
        }
    };
    v.to_string()
}

/// The v1–v3 error-stream message: nothing on success, text otherwise.
pub(crate) fn legacy_status(outcome: &Outcome) -> Option<String> {
    match outcome {
        Ok(s) if s.success() => None,
        Ok(s) => Some(format!(
            "command terminated with non-zero exit code: exit status {}",
            s.code
        )),
        Err(e) => Some(crate::error_chain(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_json_matches_client_go_expectations() {
        let ok: serde_json::Value =
            serde_json::from_str(&v4_status(&Ok(ExitStatus::SUCCESS))).expect("json");
        assert_eq!(ok, serde_json::json!({"metadata": {}, "status": "Success"}));
        let failed: serde_json::Value =
            serde_json::from_str(&v4_status(&Ok(ExitStatus { code: 42 }))).expect("json");
        assert_eq!(failed["reason"], "NonZeroExitCode");
        assert_eq!(failed["details"]["causes"][0]["reason"], "ExitCode");
        assert_eq!(failed["details"]["causes"][0]["message"], "42");
        let err: serde_json::Value =
            serde_json::from_str(&v4_status(&Err(ProviderError::NotFound("pod a/b".into()))))
                .expect("json");
        assert_eq!(err["reason"], "InternalError");
        assert_eq!(err["code"], 500);
        assert_eq!(legacy_status(&Ok(ExitStatus::SUCCESS)), None);
        assert!(legacy_status(&Ok(ExitStatus { code: 3 })).is_some_and(|m| m.contains('3')));
    }
}
