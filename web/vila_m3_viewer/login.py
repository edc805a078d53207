"""The login of one tab: when the server has auth on, the page first asks for a user name and password.

The tab's viewer logs in through its own :class:`VILAM3ChatLib.client.VilaM3Client`
(``POST /auth/token``); the token stays in that client's memory only (never in a file, the URL or
the page's state) and the password is dropped as soon as the server answered. The page shows who
is logged in (``GET /auth/token/valid``) with a *Log out* button. When the server later refuses the
token (401: expired or revoked), :meth:`TabLogin.needs_login` empties the tab and brings the form
back, saying why. What a user may do is the server's decision: a 403 is shown like any error.

Kiosk mode: a viewer started with ``--username`` (``VILA_M3_PASSWORD``) or ``VILA_M3_TOKEN`` logs
every tab in as that one user, and the form never shows.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from trame.widgets import html
from trame.widgets import vuetify3 as v3
from VILAM3ChatLib.client import AuthError, RequestTimeout, ServerUnavailable, VilaM3Error
from VILAM3ChatLib.worker import BackgroundJobs

if TYPE_CHECKING:
    from .app import ChatViewer

logger = logging.getLogger(__name__)

WRONG_PASSWORD = "Wrong user name or password (or this account may not use this server)."
EXPIRED = "Your login has ended: the server no longer accepts it (expired or revoked). Log in again."


def login_error_text(err: BaseException) -> str:
    """What the form says when a login failed: a refused password in plain words, else the client's reason."""
    if isinstance(err, AuthError) and err.status == 401:
        return WRONG_PASSWORD
    if isinstance(err, (ServerUnavailable, RequestTimeout, VilaM3Error)):
        return str(err)
    return f"The login failed: {err or type(err).__name__}"


def roles_text(roles: list[str] | tuple[str, ...]) -> str:
    """``monailabel-annotator`` → ``annotator``: the roles as the page lists them."""
    return ", ".join(sorted({str(role).removeprefix("monailabel-") for role in roles}))


class TabLogin:
    """Login state and form of one :class:`~vila_m3_viewer.app.ChatViewer`.

    Args:
        viewer: the tab's viewer (its client, state, jobs and scene).
        kiosk: the viewer was started with a user or token of its own; no form.
    """

    def __init__(self, viewer: ChatViewer, kiosk: bool = False):
        self.viewer = viewer
        self.kiosk = kiosk
        s = viewer.state
        s.login_needed = False  # the form shows instead of the chat panel
        s.login_user = ""  # who is logged in ("" = nobody, or auth off)
        s.login_roles = ""
        s.login_name = ""
        s.login_password = ""
        s.login_error = ""
        s.login_busy = False

    # --- what the viewer asks ----------------------------------------------------------------------

    def needs_login(self, err: BaseException) -> bool:
        """Whether ``err`` means this tab must (again) log in; if so, the tab is emptied and the form shown
        (with why, when a login of this tab was refused). False in kiosk mode and for every other error."""
        if self.kiosk or not isinstance(err, AuthError) or err.status != 401:
            return False
        was = self.viewer.state.login_user
        logger.info("tab %s: login needed (%s)", self.viewer.server.name, "token refused" if was else "first")
        self.reset(EXPIRED if was else "")
        return True

    # --- the page's buttons --------------------------------------------------------------------------

    def log_in(self, username: str | None = None, password: str | None = None) -> None:
        """Log in with the form's user name and password (in a worker); then connect as that user."""
        s = self.viewer.state
        username = str(s.login_name if username is None else username).strip()
        password = str(s.login_password if password is None else password)
        with s:
            s.login_password = ""  # not kept in the page's state; the field is emptied
            s.dirty("login_password")  # sent even when the server's copy was already empty
        if not username or not password:
            with s:
                s.login_error = "Enter your user name and password."
            return
        if self.viewer.jobs.running("login"):
            return
        client = self.viewer.client
        with s:
            s.login_busy = True
            s.login_error = ""

        def work(job) -> dict:
            client.log_in(username, password)
            return client.who_am_i()

        def done(user: dict) -> None:
            with s:
                s.login_busy = False
                s.login_needed = False
                s.login_user = str(user.get("username") or username)
                s.login_roles = roles_text(user.get("roles") or [])
            self.viewer.refresh_server()

        def failed(err: BaseException) -> None:
            client.log_out()
            with s:
                s.login_busy = False
                s.login_error = login_error_text(err)

        self.viewer.jobs.start("login", work, done, failed)

    def log_out(self) -> None:
        """Forget the login and empty the tab; the form shows again."""
        self.reset("You are logged out.")

    # --- plumbing -------------------------------------------------------------------------------------

    def forget(self) -> None:
        """Drop the token (the tab is closing)."""
        self.viewer.client.log_out()

    def reset(self, message: str) -> None:
        """Drop the login and everything this tab showed (study, chats, segments); show the form with ``message``."""
        viewer = self.viewer
        viewer.jobs.abort_all()
        viewer.jobs = BackgroundJobs()  # what the leaving user's work still returns is never delivered
        viewer.client.log_out()
        viewer.turn = None
        viewer.chat_states.clear()
        chats = getattr(viewer, "chats", None)  # the server's chat list of the user who leaves (chat_list.py)
        if chats is not None:
            chats.listed, chats.pending = {}, None
        viewer._clear_scene()
        s = viewer.state
        with s:
            s.login_needed = True
            s.login_user = s.login_roles = s.login_password = ""
            s.login_error = message
            s.login_busy = False
            s.server_error = ""
            s.studies, s.study, s.old_chats, s.old_chat, s.chat_id = [], "", [], "", ""
            s.transcript_html = s.question = s.slice_note = ""
            s.slice_count = 0
            s.busy = s.loading = False
            s.status = f"The server at {viewer.client.server_url} asks for a login."
            s.status_error = False

    # --- the page -------------------------------------------------------------------------------------

    def ui(self) -> None:
        """The login form (shown while ``login_needed``) and the logged-in user's line with *Log out*."""
        with html.Div(v_if=("login_needed",), id="login-form", classes="d-flex flex-column ga-2"):
            html.Div("Log in to {{ server_url }}", classes="text-subtitle-1")
            v3.VTextField(v_model=("login_name",), label="User name", density="compact", hide_details=True,
                          id="login-user", autocomplete="username", disabled=("login_busy",))
            v3.VTextField(v_model=("login_password",), label="Password", type="password", density="compact",
                          hide_details=True, id="login-password", autocomplete="current-password",
                          disabled=("login_busy",), keydown_enter=(self.log_in, "[login_name, login_password]"))
            v3.VBtn("Log in", click=(self.log_in, "[login_name, login_password]"), color="primary", loading=("login_busy",), id="login-submit")
            v3.VAlert(v_if=("login_error",), text=("login_error",), type="error", density="compact",
                      id="login-error", role="alert")
        with html.Div(v_if=("login_user",), classes="d-flex align-center ga-2", id="login-user-line"):
            html.Span("Logged in as ", classes="text-body-2")
            html.Strong("{{ login_user }}", id="logged-in-user")
            html.Span("({{ login_roles }})", v_if=("login_roles",), classes="text-caption")
            v3.VSpacer()
            v3.VBtn("Log out", click=self.log_out, size="small", variant="outlined", id="log-out")
