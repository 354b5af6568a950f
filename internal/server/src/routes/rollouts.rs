//! `/api/v1/rollouts` (admin): staged agent rollouts. The state machine lives in `rm_fleet::rollouts`; the rollout
//! task (`crate::rollouts`) moves it on; these handlers create rollouts and apply the operator's verbs, each in one
//! transaction with its audit event.

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use http::StatusCode;
use rm_fleet::rollouts::{self, RolloutRefused, Verb};
use rm_protocol::rollout::{CreateRollout, ResumeRollout, RolloutList, RolloutView};

use crate::auth::Admin;
use crate::{ApiError, AppState, catalog};

/// How many rollouts `GET /api/v1/rollouts` lists.
const LIST_LIMIT: usize = 100;

pub(crate) fn refused(r: RolloutRefused) -> ApiError {
    match r {
        RolloutRefused::NotFound(_) => ApiError::refused(StatusCode::NOT_FOUND, "rollout_not_found", r.to_string()),
        RolloutRefused::State { .. } => ApiError::refused(StatusCode::CONFLICT, "rollout_state", r.to_string()),
        RolloutRefused::OverBudget(_) => ApiError::refused(StatusCode::CONFLICT, "over_budget", r.to_string()),
        RolloutRefused::Invalid(message) => ApiError::InvalidRequest(message),
    }
}

fn id_param(path: Result<Path<String>, PathRejection>) -> Result<u64, ApiError> {
    let Path(id) = path?;
    id.parse::<u64>()
        .map_err(|_| refused(RolloutRefused::NotFound(0)).with("id", id.chars().take(32).collect::<String>()))
}

/// `GET /api/v1/rollouts` → [`RolloutList`], newest first.
pub async fn list(_: Admin, State(state): State<AppState>) -> Result<Json<RolloutList>, ApiError> {
    let rollouts = state.fleet().call(|c| crate::rollouts::list_views(c, LIST_LIMIT)).await?;
    Ok(Json(RolloutList { rollouts }))
}

/// `GET /api/v1/rollouts/{id}` → [`RolloutView`] with its hosts.
pub async fn get(
    _: Admin,
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<RolloutView>, ApiError> {
    let id = id_param(path)?;
    let view = state.fleet().call(move |c| crate::rollouts::load_view(c, id, true)).await?;
    view.map(Json).ok_or_else(|| refused(RolloutRefused::NotFound(id)))
}

/// Creates (and with `start`, starts) a rollout; the API's and the CLI's way in. `served` is the catalog's entries
/// (for a rollout without targets).
pub fn create_in(
    c: &rm_fleet::Connection,
    spec: CreateRollout,
    served: &[rm_protocol::PlatformEntry],
    default: Option<&rm_protocol::rollout::Strategy>,
    tuning: rollouts::Tuning,
    source: &str,
) -> Result<Result<RolloutView, RolloutRefused>, rm_fleet::DbError> {
    let now = rm_fleet::now();
    let targets = match spec.targets {
        Some(list) => list.into_iter().map(|t| (t.os, t.arch, t.sha256.to_ascii_lowercase())).collect(),
        None => crate::rollouts::default_targets(c, served)?,
    };
    let strategy = spec.strategy.or_else(|| default.cloned()).unwrap_or_default();
    let id = match rollouts::create_rollout(c, now, targets, &strategy, source)? {
        Ok(id) => id,
        Err(e) => return Ok(Err(e)),
    };
    if spec.start
        && let Err(e) = rollouts::start_rollout(c, now, id, source, tuning)?
    {
        return Ok(Err(e));
    }
    Ok(Ok(crate::rollouts::load_view(c, id, false)?.expect("just created")))
}

/// `POST /api/v1/rollouts` → 201 [`RolloutView`]
pub async fn create(
    _: Admin,
    State(state): State<AppState>,
    body: Result<Json<CreateRollout>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(spec) = body?;
    let served = catalog::entries(&state, String::new()).await?;
    let default = state.settings().rollout_strategy.clone();
    let tuning = crate::rollouts::tuning(&state);
    let view = state
        .fleet()
        .call(move |c| {
            // All or nothing: a start that is refused leaves no rollout behind.
            atomically(c, |c| create_in(c, spec, &served, default.as_ref(), tuning, "api"))
        })
        .await?
        .map_err(refused)?;
    Ok((StatusCode::CREATED, Json(view)).into_response())
}

/// `POST /api/v1/rollouts/{id}/{verb}` with verb `start`, `pause`, `resume` (optional [`ResumeRollout`] body),
/// `abort` or `rollback` → [`RolloutView`].
pub async fn act(
    _: Admin,
    State(state): State<AppState>,
    path: Result<Path<(String, String)>, PathRejection>,
    body: Bytes,
) -> Result<Json<RolloutView>, ApiError> {
    let Path((id, verb)) = path?;
    let id: u64 = id.parse().map_err(|_| refused(RolloutRefused::NotFound(0)))?;
    let resume = if body.iter().all(u8::is_ascii_whitespace) {
        ResumeRollout::default()
    } else {
        serde_json::from_slice::<ResumeRollout>(&body)
            .map_err(|e| ApiError::InvalidRequest(format!("not a resume body: {e}")))?
    };
    let verb = parse_verb(&verb, resume)?;
    let tuning = crate::rollouts::tuning(&state);
    let view = state
        .fleet()
        .call(move |c| {
            let outcome = apply(c, id, verb, tuning, "api")?;
            Ok(match outcome {
                Ok(()) => Ok(crate::rollouts::load_view(c, id, false)?.expect("acted on")),
                Err(e) => Err(e),
            })
        })
        .await?
        .map_err(refused)?;
    Ok(Json(view))
}

/// `start` or one of [`Verb`].
#[derive(Debug, Clone, Copy)]
pub enum Action {
    Start,
    Other(Verb),
}

pub fn parse_verb(verb: &str, resume: ResumeRollout) -> Result<Action, ApiError> {
    Ok(match verb {
        "start" => Action::Start,
        "pause" => Action::Other(Verb::Pause),
        "resume" => Action::Other(Verb::Resume { skip_failed: resume.skip_failed }),
        "abort" => Action::Other(Verb::Abort),
        "rollback" => Action::Other(Verb::Rollback),
        _ => {
            return Err(ApiError::NotFound(format!(
                "no rollout action {:?} (start, pause, resume, abort, rollback)",
                verb.chars().take(32).collect::<String>()
            )));
        }
    })
}

/// Applies an action in one transaction (nothing is written when it is refused).
pub fn apply(
    c: &rm_fleet::Connection,
    id: u64,
    action: Action,
    tuning: rollouts::Tuning,
    source: &str,
) -> Result<Result<(), RolloutRefused>, rm_fleet::DbError> {
    let now = rm_fleet::now();
    atomically(c, |c| match action {
        Action::Start => rollouts::start_rollout(c, now, id, source, tuning),
        Action::Other(verb) => rollouts::act(c, now, id, verb, source),
    })
}

/// Runs `f` in a savepoint (the database thread already holds a transaction): released when it answers `Ok(Ok)`,
/// rolled back when it refuses or fails.
pub fn atomically<T>(
    c: &rm_fleet::Connection,
    f: impl FnOnce(&rm_fleet::Connection) -> Result<Result<T, RolloutRefused>, rm_fleet::DbError>,
) -> Result<Result<T, RolloutRefused>, rm_fleet::DbError> {
    c.execute_batch("SAVEPOINT rollout")?;
    let out = f(c);
    if matches!(out, Ok(Ok(_))) {
        c.execute_batch("RELEASE rollout")?;
    } else {
        c.execute_batch("ROLLBACK TO rollout; RELEASE rollout")?;
    }
    out
}
