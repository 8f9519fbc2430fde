// Come back to the page that asked for the token once logged in.
"use strict";
document.getElementById("login-form").action = "/login?next=" + encodeURIComponent(location.pathname);
