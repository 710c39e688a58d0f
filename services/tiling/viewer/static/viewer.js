// Tessera slide viewer: OpenSeadragon over the Deep Zoom tiles of one slide, the slide's
// catalogue record beside it. The bearer token comes from the URL fragment (#token=..., never
// sent to a server and removed from the address bar at once) or from the form, is kept in
// sessionStorage for this tab only, and is sent as an Authorization header on every request.
"use strict";
(function () {
  const TOKEN_KEY = "tessera.token";
  const state = { tilesLoaded: 0, tilesFailed: 0, fullyLoaded: false, viewer: null, error: "" };
  window.tesseraViewer = state;

  const $ = (id) => document.getElementById(id);
  const setState = (s) => {
    document.body.dataset.state = s;
  };
  const parts = location.pathname.split("/").filter(Boolean);
  const slideId = decodeURIComponent(parts[parts.length - 1] || "");

  function takeToken() {
    const fragment = new URLSearchParams(location.hash.slice(1));
    const fromFragment = fragment.get("token");
    if (fromFragment) {
      sessionStorage.setItem(TOKEN_KEY, fromFragment);
      history.replaceState(null, "", location.pathname + location.search);
      return fromFragment;
    }
    return sessionStorage.getItem(TOKEN_KEY);
  }

  function showError(message, kind) {
    const box = $("error");
    box.textContent = message;
    box.hidden = false;
    state.error = message;
    setState(kind);
  }

  function explain(status, body) {
    const reason = body && body.error ? " (" + body.error + ")" : "";
    if (status === 401) return "Not signed in, or the token has expired" + reason + ".";
    if (status === 403) return "Access denied: you hold no grant to view this slide" + reason + ".";
    if (status === 404) return "No such slide, or it is not tiled yet" + reason + ".";
    if (status === 409) return "This slide could not be tiled" + reason + ".";
    return "The tile service answered " + status + reason + ".";
  }

  async function getWithToken(url, token) {
    const response = await fetch(url, { headers: { Authorization: "Bearer " + token } });
    let body = null;
    if (!response.ok) {
      try {
        body = await response.json();
      } catch (_) {
        body = null;
      }
    }
    return { response, body };
  }

  function field(list, name, value) {
    if (value === undefined || value === null || value === "") return;
    const dt = document.createElement("dt");
    dt.textContent = name;
    const dd = document.createElement("dd");
    dd.textContent = String(value);
    list.append(dt, dd);
  }

  async function showRecord(token) {
    const status = $("record-status");
    const { response, body } = await getWithToken(
      "/api/slides/" + encodeURIComponent(slideId),
      token,
    );
    if (!response.ok) {
      status.textContent = explain(response.status, body);
      status.className = "error";
      return;
    }
    const r = await response.json();
    status.textContent = "";
    const list = $("record-fields");
    list.replaceChildren();
    const g = r.geometry || {};
    const c = r.clinical || {};
    const p = r.pyramid || {};
    const d = r.deid || {};
    field(list, "slide", r.slide_id);
    field(list, "dataset", r.dataset_id);
    field(list, "status", String(r.status || "").replace("SLIDE_STATUS_", ""));
    field(list, "format", String(r.format || "").replace("SLIDE_FORMAT_", ""));
    field(list, "size", g.width && g.height ? g.width + " × " + g.height + " px" : "");
    field(list, "µm/px", g.mpp_x ? Number(g.mpp_x).toFixed(4) : "");
    field(list, "stain", c.stain);
    field(list, "organ", c.organ);
    field(list, "species", c.species);
    field(list, "pyramid", p.level_count ? p.level_count + " levels, " + p.tile_count + " tiles" : "");
    field(list, "de-identified", d.verified ? "verified" : "");
    $("record-raw").textContent = JSON.stringify(r, null, 2);
    $("record-raw-box").hidden = false;
    $("title").textContent = "slide " + r.slide_id;
  }

  async function showSlide(token) {
    const base = "/slides/" + encodeURIComponent(slideId);
    const { response, body } = await getWithToken(base + ".dzi", token);
    if (!response.ok) {
      showError(explain(response.status, body), response.status === 403 ? "denied" : "error");
      return;
    }
    const xml = new DOMParser().parseFromString(await response.text(), "application/xml");
    const image = xml.documentElement;
    const size = image.getElementsByTagNameNS(image.namespaceURI, "Size")[0];
    const viewer = OpenSeadragon({
      element: $("osd"),
      prefixUrl: "/viewer/static/vendor/openseadragon/images/",
      tileSources: {
        Image: {
          xmlns: image.namespaceURI,
          Url: base + "_files/",
          Format: image.getAttribute("Format"),
          Overlap: image.getAttribute("Overlap"),
          TileSize: image.getAttribute("TileSize"),
          Size: { Width: size.getAttribute("Width"), Height: size.getAttribute("Height") },
        },
      },
      loadTilesWithAjax: true,
      ajaxHeaders: { Authorization: "Bearer " + token },
      drawer: "canvas",
      showNavigator: true,
      maxZoomPixelRatio: 2,
    });
    state.viewer = viewer;
    viewer.addHandler("tile-loaded", () => {
      state.tilesLoaded += 1;
    });
    viewer.addHandler("tile-load-failed", (event) => {
      state.tilesFailed += 1;
      const message = String(event.message || "");
      if (message.includes("403")) showError(explain(403, null), "denied");
    });
    viewer.world.addHandler("add-item", (event) => {
      event.item.addHandler("fully-loaded-change", (e) => {
        if (e.fullyLoaded) {
          state.fullyLoaded = true;
          if (!state.error) setState("ready");
        }
      });
    });
  }

  function start(token) {
    $("login").hidden = true;
    setState("loading");
    // the record panel still shows the login prompt: say it is loading until its answer comes
    $("record-status").textContent = "loading…";
    $("record-status").className = "";
    showRecord(token).catch((e) => {
      $("record-status").textContent = "The record could not be loaded: " + e;
    });
    showSlide(token).catch((e) => showError("The slide could not be shown: " + e, "error"));
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("login").addEventListener("submit", (event) => {
      event.preventDefault();
      const token = $("token").value.trim();
      if (!token) return;
      sessionStorage.setItem(TOKEN_KEY, token);
      $("token").value = "";
      start(token);
    });
    const token = takeToken();
    if (token) {
      start(token);
    } else {
      $("login").hidden = false;
      $("record-status").textContent = "Enter a bearer token to open the slide.";
      setState("login");
    }
  });
})();
