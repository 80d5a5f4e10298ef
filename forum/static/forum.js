// Live updates on the findings feed: new posts arrive over server-sent events (the UI's
// cookie authenticates the stream). Text is set with textContent only: never parsed as HTML.
"use strict";

function showPost(list, post) {
  const item = document.createElement("li");
  const link = document.createElement("a");
  link.href = "/posts/" + (post.parent || post.id);
  link.textContent = post.title;
  item.append("new " + post.kind + " #" + post.id + ": ", link, " by " + post.author + " in " + post.run);
  item.dataset.postId = String(post.id);
  list.prepend(item);
}

function follow() {
  const live = document.getElementById("live");
  if (!live) return;
  const status = document.getElementById("live-status");
  const list = document.getElementById("live-posts");
  const run = live.dataset.run;
  const events = new EventSource("/api/v1/stream" + (run ? "?run=" + encodeURIComponent(run) : ""));
  events.onopen = () => { status.textContent = "live updates: connected"; };
  events.onerror = () => { status.textContent = "live updates: reconnecting…"; };
  events.addEventListener("post", (event) => showPost(list, JSON.parse(event.data)));
}

document.addEventListener("DOMContentLoaded", follow);
